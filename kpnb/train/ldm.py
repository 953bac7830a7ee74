"""Training the keypoint LDM: EMA, guidance dropout, min-SNR weighting, through the one loop."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from kpnb.core.runtime import Method, Runtime, current
from kpnb.diffusion.ldm import ARCH_KEYS, KeypointLDM, ldm_from_settings, scale_factor_of
from kpnb.poses.conditioning import check_poses, flip_batch, flip_poses, mask_joints, parse_modes
from kpnb.train import checkpoints
from kpnb.train import loop as training

# ======================================================================================================
# Training and loading
# ======================================================================================================
#: The keys of a preset's ``diffusion`` section that drive :func:`train_ldm` (besides :data:`ARCH_KEYS`).
TRAIN_KEYS = ("steps", "batch_size", "lr", "warmup", "ema_decay", "p_uncond", "min_snr", "flip", "ckpt_every",
              "seed", "lr_schedule", "joint_drop")


def _train_record(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings saved with each checkpoint (a resumed run must match them; "steps" may change).
    AdamW runs without weight decay."""
    return {"batch_size": cfg["batch_size"], "lr": cfg["lr"], "warmup": cfg["warmup"], "weight_decay": 0.0,
            **{k: cfg[k] for k in ("ema_decay", "p_uncond", "min_snr", "flip", "ckpt_every", "seed", "lr_schedule")},
            # recorded only when used, so a checkpoint trained before the key existed still resumes
            **({"joint_drop": cfg["joint_drop"]} if cfg["joint_drop"] else {})}


@dataclass(frozen=True)
class LatentSet:
    """What :func:`train_ldm` trains on: unscaled pre-quantisation ``latents`` [N, C, h, w] - or a
    :func:`kpnb.diffusion.ldm.latent_cache` [N, 2, C, h, w], the flipped image's own latents at ``[:, 1]`` - and
    their ``poses`` [N, 17, 3]. ``rows``: train on these rows only (e.g. a stricter subset), read from
    ``latents`` as it is (a memory map stays one); None = all. ``scale_factor``: None = 1/std of all of
    ``latents``, so a subset keeps the whole set's scale."""
    latents: Any
    poses: Any
    rows: Any = None
    scale_factor: float | None = None

    def checked(self) -> tuple[Any, torch.Tensor, np.ndarray, float]:
        """(latents, the poses of ``rows``, rows, scale factor), every shape checked."""
        mirrored = self.latents.ndim == 5
        latents = self.latents if mirrored else torch.as_tensor(self.latents)
        poses = check_poses(self.poses, name="train poses")
        if len(latents) != len(poses):
            raise ValueError(f"train_ldm: {len(latents)} latents but {len(poses)} poses")
        sf = (scale_factor_of(latents[:, 0] if mirrored else latents) if self.scale_factor is None
              else float(self.scale_factor))
        rows = np.arange(len(latents)) if self.rows is None else np.asarray(self.rows, dtype=np.int64)
        if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= len(latents):
            raise ValueError(f"train_ldm: rows must be a non-empty list of indices into the {len(latents)} latents")
        return latents, poses[torch.as_tensor(rows)], rows, sf


def _check_settings(cfg: Mapping[str, Any]) -> None:
    missing = [k for k in ARCH_KEYS + TRAIN_KEYS if k not in cfg]
    if missing:
        raise KeyError(f"train_ldm: the diffusion settings lack {', '.join(missing)}; pass a preset's section, "
                       f"kpnb.core.settings.preset_config(name)['diffusion']")
    if cfg["lr_schedule"] not in ("cosine", "constant"):
        raise ValueError(f"diffusion.lr_schedule must be 'cosine' or 'constant', got {cfg['lr_schedule']!r}")


def train_ldm(data: LatentSet, cfg: Mapping[str, Any], ckpt_dir: str | Path, modes: str | Sequence[str], *,
              progress: bool = True, resume: bool = True, on_log: Callable[[dict[str, float]], None] | None = None,
              runtime: Runtime | None = None) -> tuple[KeypointLDM, Any]:
    """Train a KeypointLDM on ``data`` (:class:`LatentSet`: latents, poses, which rows, the scale factor).

    ``cfg``: a preset's ``diffusion`` section (every key of :data:`ARCH_KEYS` and :data:`TRAIN_KEYS`). Each
    step: a batch by :func:`kpnb.train.loop.batch_indices`, half the samples flipped together with their poses
    (``flip``), joints masked as in a person's annotation (``joint_drop``, :func:`kpnb.poses.conditioning.mask_joints`),
    per-sample conditioning dropout (``p_uncond``), AdamW (no weight decay) with warm-up, then a
    cosine or constant learning rate (``lr_schedule``), EMA of the weights. All randomness of step s comes from
    ``seeded_generator(seed, s)`` and is drawn for the whole global batch in ``batch_fn``, so a resumed run
    matches an uninterrupted one and N ranks (``runtime``, under torchrun) train what one process would.
    ``progress``, ``resume``, ``on_log``: as :class:`kpnb.train.loop.LoopSettings` and :func:`kpnb.train.loop.train`.
    Returns (the EMA model in eval mode, the :class:`kpnb.train.loop.TrainResult`)."""
    rt = runtime or current()
    _check_settings(cfg)
    modes = parse_modes(modes)
    latents, poses, rows, sf = data.checked()
    mirrored = latents.ndim == 5  # a latent_cache: [N, 2, C, h, w], the flipped image's own latents at [:, 1]
    seed = int(cfg["seed"])
    torch.manual_seed(seed)  # the same initial weights for the same seed, in any process (a resume overwrites them)
    model = ldm_from_settings(cfg, modes, latents.shape[2 if mirrored else 1:], scale_factor=sf).to(rt.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    lr, warmup, ema_decay = cfg["lr"], cfg["warmup"], cfg["ema_decay"]
    p_uncond, min_snr, flip, joint_drop = cfg["p_uncond"], cfg["min_snr"], cfg["flip"], float(cfg["joint_drop"])
    # fused AdamW: one kernel over all tensors instead of a Python loop over them
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    bs, steps = int(cfg["batch_size"]), int(cfg["steps"])
    # constant (after warmup): a finished run can be trained further (more steps) without a jump in lr
    final_frac = 1.0 if cfg["lr_schedule"] == "constant" else 0.1
    loss_of = rt.ddp(Method(model, "loss"), "ldm")  # DDP (several ranks) and torch.compile (runtime.compile) go here

    def batch_fn(step: int) -> tuple[torch.Tensor, ...]:
        """The global batch of ``step`` with every random draw of its samples (flips, timesteps, noise, pose
        dropout), so that a rank's slice of it is exactly its part of a one-process step."""
        idx = training.batch_indices(len(rows), bs, step, seed=seed)
        g = training.seeded_generator(seed, step, 1)
        which = torch.rand(bs, generator=g) < 0.5 if flip else torch.zeros(bs, dtype=torch.bool)
        at = rows[idx.numpy()]
        if mirrored:  # the mirror image's latents (read from the memory map, row by row)
            z = torch.as_tensor(np.stack([latents[i, int(w)] for i, w in zip(at.tolist(), which.tolist())]))
            p = torch.where(which[:, None, None], flip_poses(poses[idx]), poses[idx])
        else:  # the latents mirrored in place
            z, p = flip_batch(torch.as_tensor(latents[at]).float(), poses[idx], which)
        z = z.float() * sf
        draws = model.draw(z.shape, p_uncond, g)
        if joint_drop:  # drawn last, so a run without it draws exactly what it drew before the key existed
            p = mask_joints(p, torch.rand(*p.shape[:2], 2, generator=g), joint_drop)
        return (z, p, *draws)

    def step_fn(step: int, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        z, p, *draws = batch
        training.set_lr(opt, training.warmup_cosine(step, steps, lr, warmup, final_frac=final_frac))
        with rt.autocast():
            loss = loss_of(z, p, min_snr=min_snr, draws=draws)
        rt.backward_step(loss, opt)
        # EMA warm-up as ldm's LitEma: early on the average follows the weights closely
        training.ema_update(ema, model, min(ema_decay, (1 + step) / (10 + step)))
        return {"loss": loss}

    # "steps" at the top level: kpnb.train.loop allows resuming with more (or fewer) steps, nothing else changed
    config = {"ldm": model.config(), "train": _train_record(cfg), "steps": steps, "n_train": len(rows)}
    loop = training.LoopSettings(steps=steps, ckpt_dir=ckpt_dir, config=config, batch_size=bs,
                                 ckpt_every=int(cfg["ckpt_every"]), seed=seed, desc=f"ldm[{'+'.join(modes)}]",
                                 resume=resume, progress=progress)
    result = training.train({"model": model, "ema": ema}, {"opt": opt}, step_fn, batch_fn, loop, on_log=on_log,
                            runtime=rt)
    return ema.eval(), result


def load_ldm(ckpt_dir: str | Path, use_ema: bool = True) -> KeypointLDM:
    """The model of a :func:`train_ldm` checkpoint folder (or file), EMA weights by default, in eval mode."""
    return checkpoints.load_trained(ckpt_dir, "ldm", KeypointLDM.from_config, module="ema" if use_ema else "model",
                                 what="kpnb diffusion")


@torch.no_grad()
def validation_loss(model: KeypointLDM, latents: torch.Tensor, poses: Any, *, seed: int = 0, uncond: bool = False,
                    repeats: int = 4, batch_size: int = 128) -> float:
    """The training loss (:meth:`KeypointLDM.loss`, the MSE of the UNet's target) on held-out *scaled*
    latents, with timesteps and noise fixed by ``seed`` (so modes compare on identical draws).
    ``uncond=True`` gives every sample the learned null pose: the gap between the two numbers is how much the
    model uses the pose."""
    was_training = model.training
    model.eval()
    poses = check_poses(poses)
    latents = torch.as_tensor(latents).float()
    dev = next(model.parameters()).device
    total, n = 0.0, 0
    for r in range(repeats):
        for i in range(0, len(latents), batch_size):
            g = torch.Generator().manual_seed(seed * 1_000_003 + r * 10_007 + i)  # CPU draws: same on any device
            z, p = latents[i:i + batch_size].to(dev), poses[i:i + batch_size].to(dev)
            total += float(model.loss(z, p, p_uncond=1.0 if uncond else 0.0, generator=g)) * len(z)
            n += len(z)
    model.train(was_training)
    return total / max(n, 1)
