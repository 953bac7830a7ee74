"""Where and how the models run: device, precision, ``torch.compile``, DataLoader workers, and ranks.

One :class:`Runtime` per process, made from a preset's ``runtime`` section::

    rt = runtime.Runtime.from_settings(cfg["runtime"])   # device "auto": cuda, else mps, else cpu
    model = model.to(rt.device)
    with rt.autocast():                                   # bf16/fp16 autocast, or nothing for fp32
        loss = model(x)
    rt.backward_step(loss, opt)                           # GradScaler for fp16; plain otherwise

Distributed training uses PyTorch's own engine: started under ``torchrun`` (the ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK`` environment), :func:`Runtime.from_settings` joins the process group (NCCL on CUDA, gloo on
CPU), each process takes GPU ``LOCAL_RANK``, and :meth:`Runtime.ddp` wraps a module in
``DistributedDataParallel``. :func:`kpnb.train.loop.train` gives each rank its slice of the global batch and
lets rank 0 alone write files.

Precision ``auto`` means bf16 where the device supports it (CUDA compute capability 8+), else fp16 with a
gradient scaler on CUDA, and fp32 on a CPU (bf16 matmul is slow on most CPUs). Checkpoints are always
written from CPU copies in fp32, so a GPU run's files load on a CPU and the other way round.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: The models ``runtime.compile`` can name: each is compiled (``torch.compile``) only where its name is listed.
COMPILABLE = ("vq", "ldm", "estimator", "clip", "transformer")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class RuntimeSettingError(ValueError):
    """A runtime setting that cannot be honoured here (e.g. device cuda on a machine without one)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if available, else mps, else cpu; an explicit name is checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeSettingError(f"runtime.device {name!r}: this machine has no CUDA device (use 'auto' or 'cpu')")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeSettingError(f"runtime.device {name!r}: MPS is not available here (use 'auto' or 'cpu')")
    return dev


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 on a CUDA GPU that supports it, fp16 on an older one, fp32 elsewhere."""
    if name not in PRECISIONS:
        raise RuntimeSettingError(f"runtime.precision {name!r}: choose one of {', '.join(PRECISIONS)}")
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise RuntimeSettingError("runtime.precision 'fp16' needs a GPU (CPU autocast supports bf16 only)")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def _busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(vals) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system


class ThreadPolicy:
    """torch's CPU threads = the cores other processes leave free, checked again every ``every`` seconds.

    With 2 threads on 2 cores and one other busy process, OpenMP threads wait for each other and training ran
    4-25x slower (README, "Timing"); one thread on the free core runs at about half speed instead. Other
    processes' load is the machine's busy CPU time minus this process's own, over the last interval; so this
    run's own DataLoader workers, and other ranks of a torchrun on the same machine, count as other processes
    (the ranks then share the cores instead of oversubscribing them)."""

    def __init__(self, max_threads: int | None = None, every: float = 30.0):
        self.max = max_threads or os.cpu_count() or 1
        self.every = every
        self.restart()

    def other_load(self, window: float = 0.0) -> float | None:
        """Cores' worth of CPU used by other processes since the last call (after sleeping ``window`` s)."""
        if window:
            time.sleep(window)
        now = (time.monotonic(), _busy_seconds(), _own_seconds())
        (t0, b0, o0), (t1, b1, o1) = self._last, now
        self._last = now
        if b0 is None or b1 is None or t1 - t0 <= 0:
            return None
        return max(0.0, ((b1 - b0) - (o1 - o0)) / (t1 - t0))

    def fit(self, window: float = 0.0) -> int:
        """Set torch's threads to the free cores (at least 1); returns the count."""
        other = self.other_load(window)
        if other is None:
            return torch.get_num_threads()
        want = max(1, min(self.max, self.max - int(other + 0.5)))
        if want != torch.get_num_threads():
            torch.set_num_threads(want)
        return want

    def restart(self) -> None:
        """Start the next interval now, so that :meth:`maybe_fit` judges only what ran after this call (work
        before it, such as a process pool that drew the data, is not another process of the training)."""
        self._last = (time.monotonic(), _busy_seconds(), _own_seconds())

    def maybe_fit(self) -> int | None:
        """:meth:`fit` when ``every`` seconds have passed since the last look; the new count if it changed."""
        if time.monotonic() - self._last[0] < self.every:
            return None
        before = torch.get_num_threads()
        after = self.fit()
        return after if after != before else None


def compiled_models(setting: Any) -> frozenset[str]:
    """``runtime.compile`` as the set of models to compile: a list of names from :data:`COMPILABLE`, or a bool
    (True: all of them, False: none)."""
    if isinstance(setting, bool):
        return frozenset(COMPILABLE) if setting else frozenset()
    names = [setting] if isinstance(setting, str) else list(setting)
    bad = [n for n in names if n not in COMPILABLE]
    if bad:
        raise RuntimeSettingError(f"runtime.compile: unknown model(s) {', '.join(map(repr, bad))}; name any of "
                                  f"{', '.join(COMPILABLE)}, or true/false for all/none")
    return frozenset(names)


def dist_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


@dataclass
class Runtime:
    device: torch.device
    precision: str = "fp32"           # resolved: fp32 | bf16 | fp16
    compile: frozenset[str] = frozenset()  # the models (of COMPILABLE) that torch.compile runs
    workers: int = 0                  # DataLoader worker processes that build the batches (0: main thread)
    threads: ThreadPolicy | None = None  # CPU threads fitted to the free cores (runtime.threads "auto")
    rank: int = 0
    world_size: int = 1
    keep_checkpoints: int = 2         # the newest checkpoints a training folder keeps: one to fall back on

    @classmethod
    def from_settings(cls, section: Mapping[str, Any] | None = None) -> "Runtime":
        """A preset's ``runtime`` section (device, precision, compile, workers, threads, keep_checkpoints);
        None = CPU fp32. Under torchrun this joins the process group once per process."""
        s = section or {"device": "cpu", "precision": "fp32", "compile": False, "workers": 0, "threads": 0,
                        "keep_checkpoints": 2}
        rank, world, local = dist_env()
        device = resolve_device(str(s["device"]))
        if world > 1 and device.type == "cuda":
            device = torch.device("cuda", local)
            torch.cuda.set_device(device)
        precision = resolve_precision(str(s["precision"]), device)
        if device.type == "cuda":  # TF32 for fp32 matmuls and convolutions: ~8x faster on Ampere+, 1e-3 relative
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True
        workers = int(s["workers"])
        if workers < 0:
            raise RuntimeSettingError(f"runtime.workers must be >= 0, got {workers}")
        keep = s.get("keep_checkpoints", 2)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise RuntimeSettingError(f"runtime.keep_checkpoints must be a whole number >= 1, got {keep!r}")
        threads, policy = s["threads"], None
        if threads == "auto":
            policy = ThreadPolicy()
            policy.fit(window=0.3)
        elif int(threads) > 0:
            torch.set_num_threads(int(threads))
        if world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(device=device, precision=precision, compile=compiled_models(s["compile"]), workers=workers,
                   threads=policy, rank=rank, world_size=world, keep_checkpoints=keep)

    # ---- precision ------------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype (None for fp32)."""
        return DTYPES.get(self.precision)

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast to bf16/fp16 for the forward pass; a no-op for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def scaler(self) -> torch.amp.GradScaler | None:
        """The gradient scaler fp16 needs (created once); None otherwise."""
        if self.precision != "fp16":
            return None
        if getattr(self, "_scaler", None) is None:
            self._scaler = torch.amp.GradScaler(self.device.type)
        return self._scaler

    def backward_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, *, average: bool = False,
                      clip: float | None = None) -> None:
        """zero_grad, backward, step - through the gradient scaler under fp16. ``average``: all-reduce the
        gradients over the ranks before the step, for models that train without a DDP wrapper (the VQ's
        two-optimiser GAN step). ``clip``: clip the gradient norm (of the unscaled gradients) to this."""
        opt.zero_grad(set_to_none=True)
        sc = self.scaler
        (loss if sc is None else sc.scale(loss)).backward()
        if average and self.distributed:
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        torch.distributed.all_reduce(p.grad)
                        p.grad.div_(self.world_size)
        if clip is not None:
            if sc is not None:
                sc.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], clip)
        if sc is None:
            opt.step()
        else:
            sc.step(opt)
            sc.update()

    # ---- ranks ----------------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, CSV, metrics and shows progress."""
        return self.rank == 0

    def ddp(self, module: nn.Module, model: str) -> nn.Module:
        """``module`` wrapped in DistributedDataParallel when there are several ranks (DDP averages the
        gradients during backward), else ``module`` itself; compiled first when ``runtime.compile`` names
        ``model`` (one of :data:`COMPILABLE`). Checkpoint the unwrapped module: it shares its parameters with the
        wrapper."""
        if model not in COMPILABLE:
            raise ValueError(f"unknown model {model!r}; valid: {', '.join(COMPILABLE)}")
        if model in self.compile:
            module = torch.compile(module)
        if not self.distributed:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def shard(self, batch: Any) -> Any:
        """This rank's slice of a global batch (tensors along dim 0; tuples/lists/dicts element-wise)."""
        if not self.distributed:
            return batch
        if torch.is_tensor(batch):
            n = len(batch)
            if n % self.world_size:
                raise RuntimeSettingError(f"batch size {n} is not divisible by the {self.world_size} ranks")
            per = n // self.world_size
            return batch[self.rank * per:(self.rank + 1) * per]
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.shard(b) for b in batch)
        if isinstance(batch, Mapping):
            return {k: self.shard(v) for k, v in batch.items()}
        return batch

    def to_device(self, batch: Any) -> Any:
        """Move tensors (nested in tuples/lists/dicts) to the device; asynchronous from pinned memory."""
        if torch.is_tensor(batch):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, (tuple, list)):
            return type(batch)(self.to_device(b) for b in batch)
        if isinstance(batch, Mapping):
            return {k: self.to_device(v) for k, v in batch.items()}
        return batch

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def mean_over_ranks(self, values: Mapping[str, float]) -> dict[str, float]:
        """The mean of each value over the ranks (for logging the global batch's loss); as is with one rank."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world_size for k, v in zip(keys, t.tolist())}

    def broadcast_module(self, module: nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (after a data-dependent re-initialisation, e.g.
        a VQ codebook re-seeded from one rank's batch)."""
        if not self.distributed:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                torch.distributed.broadcast(t.data, src=0)

    def describe(self) -> str:
        ranks = f", {self.world_size} ranks" if self.distributed else ""
        cpu = f", {torch.get_num_threads()} CPU threads" + (" (fitted to the free cores)" if self.threads else "")
        compiled = f" ({', '.join(sorted(self.compile))} compiled)" if self.compile else ""
        return f"{self.device} {self.precision}{compiled}{ranks}{cpu}"


class Method(nn.Module):
    """``Method(model, "loss")(*a)`` calls ``model.loss(*a)`` through ``forward``, which is what DDP hooks
    into and torch.compile traces; it holds ``model``'s own parameters, not copies."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.module, self.method)(*args, **kwargs)


CPU = Runtime(torch.device("cpu"))
_current = CPU


def use(rt: Runtime) -> Runtime:
    """Make ``rt`` the process's current runtime: what functions given no ``runtime`` run under, and the
    device :func:`kpnb.train.checkpoints.load_trained` puts loaded models on. A notebook's
    :class:`kpnb.run.folder.NotebookRun` calls it with the preset's runtime."""
    global _current
    _current = rt
    return rt


def current() -> Runtime:
    """The runtime set by :func:`use` (CPU fp32 until then)."""
    return _current

