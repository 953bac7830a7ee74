"""The one training loop every kpnb model uses (VQ, diffusion, estimator, CLIP, transformer).

The caller supplies two plain functions and ``train`` does the rest::

    def batch_fn(step):            # the batch of ``step``, derived only from (seed, step)
        idx = batch_indices(len(data), 32, step, seed=0)
        return data[idx]

    def step_fn(step, batch):      # forward, backward, optimiser step(s); returns the losses
        loss = model(batch).mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        return {"loss": loss}

    result = train({"model": model}, {"opt": opt}, step_fn, batch_fn,
                   LoopSettings(steps=1000, ckpt_dir=run / "checkpoints" / "thing", config={"width": 64},
                                batch_size=32))

What it gives every model:

* a progress bar (:func:`kpnb.core.progress.bar`: tqdm, plus text lines for a headless run) with the latest losses, and ``ckpt_dir/metrics.csv`` (step, mean losses since
  the last row, cumulative seconds, images/s);
* checkpoints every ``ckpt_every`` steps and at the end: ``ckpt-<step>.safetensors`` (module weights and
  optimiser tensors, flat names) plus ``ckpt-<step>.json`` (config, step, optimiser hyper-parameters, RNG
  states of torch/numpy/python, elapsed seconds). Both are written atomically (temporary file + rename) and
  the JSON is written last (with the tensor file's size and sha256), so a checkpoint exists only once it is
  complete; the newest ``keep_checkpoints`` are kept, older ones removed.
* resume: calling ``train`` again with the same ``ckpt_dir`` continues from the latest checkpoint (a damaged one -
  missing, truncated, changed - is named and the previous one used, then rewritten when training reaches its
  step again), and - since the data order is a function of (seed, step) and the RNG states are restored - a
  resumed run computes the same losses as an uninterrupted one (on CPU; bit-exact up to nondeterministic kernels
  elsewhere).
* a NaN/inf guard: a non-finite loss stops training with :class:`NonFiniteLossError` naming the step and the
  loss, before anything is saved, so the last good checkpoint stays as it was (checked every step on a CPU; on
  a GPU at each log row and checkpoint, so that no step waits for a loss to reach the host).
* a :class:`kpnb.core.runtime.Runtime`: batches built ahead by DataLoader workers, moved to the device, one slice
  of the global batch per rank under torchrun, rank 0 alone writing files.

Nothing here unpickles: tensors go through :func:`kpnb.core.files.save_tensors` / :func:`kpnb.core.files.load_tensors`.
"""
from __future__ import annotations

import csv
import io
import json
import math
import random
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from kpnb.core import files
from kpnb.core import progress as kprogress
from kpnb.core.runtime import Runtime, current
from kpnb.train.checkpoints import (
    CheckpointError,
    NonFiniteLossError,
    _ckpt_paths,
    _remove_temp_files,
    _set_rng_state,
    apply_checkpoint,
    read_checkpoint,
    read_checkpoint_info,
    save_checkpoint,
)


# ---- data order ---------------------------------------------------------------------------------------
def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (e.g. (seed, step)): the same keys, the same stream."""
    h = 1469598103934665603
    for k in keys:  # FNV-1a over the keys: cheap, stable across processes (unlike hash())
        h = ((h ^ (int(k) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return torch.Generator().manual_seed(h)


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=seeded_generator(seed, epoch, n))


def batch_indices(n: int, batch_size: int, step: int, seed: int = 0) -> torch.Tensor:
    """Indices of the batch of ``step``: consecutive slices of a per-epoch random permutation of ``range(n)``.
    A pure function of (n, batch_size, step, seed), so resuming needs no saved iterator."""
    if n <= 0:
        raise ValueError("batch_indices: the dataset is empty")
    pos = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(batch_size, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = _epoch_permutation(n, seed, e)[offsets[sel]]
    return out


def warmup_cosine(step: int, steps: int, base_lr: float, warmup: int = 0, final_frac: float = 0.1) -> float:
    """A learning rate as a pure function of the step (no scheduler state to save): linear warm-up, then
    cosine decay to ``final_frac * base_lr``."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, steps - warmup))
    return base_lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


@torch.no_grad()
def ema_update(ema_module: nn.Module, module: nn.Module, decay: float) -> None:
    """Exponential moving average of weights (buffers are copied). Keep the EMA copy in ``modules`` so it
    is checkpointed with the rest. One ``_foreach_lerp_`` over all parameters instead of a Python loop of
    per-tensor kernels (the same arithmetic, the same bits)."""
    ema_params = list(ema_module.parameters())
    if ema_params:
        torch._foreach_lerp_(ema_params, [p.detach() for p in module.parameters()], 1 - decay)
    for e, b in zip(ema_module.buffers(), module.buffers()):
        e.copy_(b)


# ---- metrics CSV --------------------------------------------------------------------------------------
def _read_csv(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _write_csv(path: Path, rows: list[dict[str, float]]) -> None:
    keys = ["step"] + sorted({k for r in rows for k in r} - {"step", "seconds", "images_per_s"}) + [
        "seconds", "images_per_s"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (int(r[k]) if k == "step" else f"{r[k]:.6g}") if k in r else "" for k in keys})
    files.atomic_write_bytes(path, buf.getvalue().encode())


# ---- the loop -----------------------------------------------------------------------------------------
class _StepBatches(torch.utils.data.Dataset):
    """Item i = this rank's slice of the global batch of step ``start + i`` (built in a DataLoader worker)."""

    def __init__(self, batch_fn: Callable[[int], Any], start: int, steps: int, rt: Runtime):
        self.batch_fn, self.start, self.steps, self.rt = batch_fn, start, steps, rt

    def __len__(self) -> int:
        return self.steps - self.start

    def __getitem__(self, i: int) -> Any:
        return self.rt.shard(self.batch_fn(self.start + i))


def _batches(batch_fn: Callable[[int], Any], start: int, steps: int, rt: Runtime) -> Iterator[tuple[int, Any]]:
    """(step, batch on the device) for steps [start, steps): built on the main thread (workers 0), or by
    ``rt.workers`` processes that keep 4 batches each ready ahead of the step (pinned memory on CUDA)."""
    steps_ds = _StepBatches(batch_fn, start, steps, rt)
    if rt.workers == 0 or len(steps_ds) == 0:
        for i in range(len(steps_ds)):
            yield start + i, rt.to_device(steps_ds[i])
        return
    loader = torch.utils.data.DataLoader(steps_ds, batch_size=None, shuffle=False, num_workers=rt.workers,
                                         pin_memory=rt.device.type == "cuda", prefetch_factor=4)
    for i, batch in enumerate(loader):
        yield start + i, rt.to_device(batch)


@dataclass
class TrainResult:
    step: int                      # steps completed
    start_step: int                # where this call started (0, or the resumed checkpoint's step)
    seconds: float                 # training seconds over all calls (resumes included)
    images_per_s: float | None     # over this call's steps; over the whole run when it ran none (None: unknown)
    history: list[dict[str, float]] = field(default_factory=list)  # the metrics.csv rows
    checkpoint: Path | None = None


@dataclass(frozen=True)
class LoopSettings:
    """How :func:`train` runs, and where it writes.

    ``steps``: the total (a resumed run continues up to it). ``ckpt_dir``: checkpoints and metrics.csv.
    ``config`` (JSON-able) is saved with each checkpoint; resuming with a different config (other than
    ``steps``) is refused, so a checkpoint is never continued with another model. ``batch_size`` (the global
    batch) only feeds the images/s figure. ``seed`` seeds the global RNGs at a fresh start (resume restores
    them instead). ``desc`` labels the progress bar and the NaN error; ``resume=False`` starts afresh even
    where a checkpoint exists; ``progress=False`` hides the bar. ``keep_checkpoints``: how many of the newest
    checkpoints the folder keeps, so that a damaged newest one leaves one to go on from (None: the runtime's,
    ``runtime.keep_checkpoints``)."""
    steps: int
    ckpt_dir: str | Path
    config: Mapping[str, Any] | None = None
    batch_size: int = 1
    ckpt_every: int = 500
    log_every: int = 10
    seed: int = 0
    desc: str = "train"
    resume: bool = True
    progress: bool = True
    keep_checkpoints: int | None = None

    def __post_init__(self) -> None:
        k = self.keep_checkpoints
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"keep_checkpoints (runtime.keep_checkpoints) must be a whole number >= 1, got {k!r}")


def _resume_or_start(modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
                     s: LoopSettings, config: dict[str, Any], rt: Runtime
                     ) -> tuple[int, float, Path | None, list[dict[str, float]]]:
    """(start step, seconds trained before, the checkpoint resumed from, metrics rows so far): the newest usable
    checkpoint of ``s.ckpt_dir`` (:func:`kpnb.train.checkpoints.read_checkpoint`: a damaged one is named and the
    previous one read) loaded into ``modules`` and ``optimizers`` with its RNG states, or a fresh start with the
    global RNGs seeded from ``s.seed``."""
    ckpt_dir = Path(s.ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    csv_path = ckpt_dir / "metrics.csv"
    ck = read_checkpoint(ckpt_dir, missing_ok=True) if s.resume else None
    rt.barrier()  # every rank has picked the same checkpoint before rank 0 cleans or writes anything
    if rt.is_main:
        _remove_temp_files(ckpt_dir)
    if ck is None:
        torch.manual_seed(s.seed)
        np.random.seed(s.seed % (1 << 32))
        random.seed(s.seed)
        if rt.is_main:
            csv_path.unlink(missing_ok=True)
        return 0, 0.0, None, []
    info, last = ck.info, ck.json
    saved = {k: v for k, v in info.get("config", {}).items() if k != "steps"}
    given = {k: v for k, v in config.items() if k != "steps"}
    if saved != given:
        diff = sorted(k for k in set(saved) | set(given) if saved.get(k) != given.get(k))
        raise CheckpointError(f"{last}: saved with a different config (keys {', '.join(diff)}); "
                              f"use another checkpoint folder or resume=False")
    apply_checkpoint(ck, modules, optimizers=optimizers)
    _set_rng_state(info["rng"])
    start, elapsed = int(info["step"]), float(info.get("seconds", 0.0))
    if start > s.steps:
        raise CheckpointError(f"{last}: this folder's model is already trained {start} steps, past the {s.steps} "
                              f"asked; ask for at least {start} steps or use another checkpoint folder")
    history = [r for r in _read_csv(csv_path) if r["step"] <= start]  # rows logged after it are redone
    return start, elapsed, last, history


class _Row:
    """The losses of the steps since the last metrics row, summed per key (a key may appear only on some
    steps, e.g. GAN terms). Tensors stay on the device until the row is read: a float() per step would
    stall a GPU."""

    def __init__(self, t0: float):
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}
        self.n, self.t0 = 0, t0

    def add(self, out: Mapping[str, float | torch.Tensor]) -> None:
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else float(v))
            self.counts[k] = self.counts.get(k, 0) + 1
        self.n += 1

    def means(self, rt: Runtime) -> dict[str, float]:
        return rt.mean_over_ranks({k: float(v) / self.counts[k] for k, v in self.sums.items()})


def _check_finite(means: Mapping[str, float], step: int, row: _Row, every_step: bool, ckpt_path: Path | None,
                  s: LoopSettings) -> None:
    """Stop with :class:`NonFiniteLossError` at a non-finite mean loss, before anything is saved. Checked every
    step on a CPU (``every_step``); on a GPU only at log rows and checkpoints, so the message names the steps
    the row covers."""
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if not bad:
        return
    where = f"{ckpt_path.name} (step {read_checkpoint_info(ckpt_path)['step']})" if ckpt_path else "none"
    when = f"at step {step}" if every_step or row.n == 1 else f"in steps {step - row.n + 1}-{step}"
    raise NonFiniteLossError(
        f"{s.desc}: loss {bad[0]!r} is {means[bad[0]]} {when}; training stopped. Last good checkpoint in "
        f"{Path(s.ckpt_dir)}: {where} (left untouched). Lower the learning rate or check the data of this step.")


def _save(modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer], s: LoopSettings,
          config: dict[str, Any], done: int, seconds: float, rt: Runtime, keep: int) -> Path:
    """The checkpoint of step ``done``, written by rank 0 while the other ranks wait for it; the folder then keeps
    the ``keep`` newest."""
    if rt.is_main:
        save_checkpoint(s.ckpt_dir, done, modules, optimizers, config,
                        {"seconds": seconds, "seed": s.seed, "data_order": "batch_fn(step): a function of (seed, step)",
                         "world_size": rt.world_size}, keep=keep)
    rt.barrier()  # no rank runs ahead of a checkpoint that is still being written
    return _ckpt_paths(Path(s.ckpt_dir), done)[1]


def train(modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer],
          step_fn: Callable[[int, Any], Mapping[str, float | torch.Tensor]], batch_fn: Callable[[int], Any],
          settings: LoopSettings, *, on_log: Callable[[dict[str, float]], None] | None = None,
          runtime: Runtime | None = None) -> TrainResult:
    """Run ``step_fn(step, batch_fn(step))`` for steps ``[start, settings.steps)``; see the module docstring
    and :class:`LoopSettings`. ``on_log(row)`` is called with each metrics row (e.g. to draw a live loss curve).

    ``runtime`` (:class:`kpnb.core.runtime.Runtime`, default CPU): batches are built by ``runtime.workers``
    DataLoader workers ahead of the step (pinned memory on CUDA), cut to this rank's slice
    (:meth:`~kpnb.core.runtime.Runtime.shard`; ``batch_fn`` returns the global batch with all its per-sample random
    draws, so N ranks compute what one process would) and moved to the device. With several ranks, the logged
    losses are means over the ranks and rank 0 alone writes metrics.csv and checkpoints; every rank resumes
    from the same checkpoint, whatever the number of ranks that wrote it.
    """
    s, rt = settings, runtime or current()
    main = rt.is_main
    config = json.loads(json.dumps(dict(s.config or {}), default=files._json_default))  # as it will read back
    csv_path = Path(s.ckpt_dir) / "metrics.csv"
    start, elapsed, ckpt_path, history = _resume_or_start(modules, optimizers, s, config, rt)
    for m in modules.values():
        m.train()
    check_every_step = rt.device.type == "cpu"
    if rt.threads is not None:
        rt.threads.restart()
    bar = kprogress.bar(total=s.steps, initial=start, desc=s.desc, disable=not (s.progress and main), report=main)
    t_call = time.perf_counter()
    row, ran = _Row(t_call), 0
    try:
        for step, batch in _batches(batch_fn, start, s.steps, rt):
            row.add(step_fn(step, batch))
            ran += 1
            done = step + 1
            log_now = done % s.log_every == 0 or done == s.steps
            save_now = done % s.ckpt_every == 0 or done == s.steps
            if check_every_step or log_now or save_now:
                means = row.means(rt)
                _check_finite(means, step, row, check_every_step, ckpt_path, s)
            if log_now and rt.threads is not None and (changed := rt.threads.maybe_fit()) is not None:
                kprogress.note(f"{s.desc}: torch threads now {changed} (the cores other processes leave free)")
            if log_now:
                now = time.perf_counter()
                history.append({"step": done, **means, "seconds": elapsed + now - t_call,
                                "images_per_s": row.n * s.batch_size / (now - row.t0)})
                if main:
                    _write_csv(csv_path, history)
                bar.set_postfix({k: f"{v:.4g}" for k, v in history[-1].items() if k not in ("step", "seconds")},
                                refresh=False)
                if on_log is not None and main:
                    on_log(history[-1])
                row = _Row(now)
            bar.update(1)
            if save_now:
                # a fresh start's first checkpoint replaces whatever the folder held (resume=False)
                keep = (s.keep_checkpoints or rt.keep_checkpoints) if ckpt_path is not None else 1
                ckpt_path = _save(modules, optimizers, s, config, done, elapsed + time.perf_counter() - t_call, rt,
                                  keep)
    finally:
        bar.close()
    call_s = time.perf_counter() - t_call
    return TrainResult(step=max(start, s.steps), start_step=start, seconds=elapsed + call_s,
                       images_per_s=(ran * s.batch_size / call_s) if ran else
                       (start * s.batch_size / elapsed if start and elapsed > 0 else None), history=history,
                       checkpoint=ckpt_path)
