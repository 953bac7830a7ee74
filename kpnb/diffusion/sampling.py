"""DDIM sampling of the keypoint LDM."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kpnb.core.runtime import current
from kpnb.diffusion.ldm import KeypointLDM, decode_latents, snap_to_codebook
from kpnb.diffusion.schedule import ddim_sigma, ddim_step
from kpnb.poses.conditioning import check_poses


@torch.no_grad()
def ddim_sample(model: KeypointLDM, poses: Any, *, steps: int = 50, eta: float = 0.0, guidance: float = 1.0,
                guidance_interval: Sequence[int] | None = None, generator: torch.Generator | None = None,
                seed: int | None = None,
                x_T: torch.Tensor | None = None, x0: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                callback: Callable[[dict[str, Any]], None] | None = None) -> torch.Tensor:
    """Sample scaled latents ``[B, C, h, w]`` for ``poses`` (anything :func:`check_poses` takes).

    * ``steps``, ``eta`` (0 = deterministic DDIM, 1 = DDPM-like), ``guidance`` (classifier-free scale:
      1 = conditional only, 0 = unconditional, >1 pushes towards the pose).
    * ``guidance_interval``: ``[lo, hi]``, the timesteps ``lo <= t < hi`` at which ``guidance`` applies; the
      other steps run the conditional branch alone (guidance 1, one UNet pass). None = every step. Guidance
      at high noise cost FID for little pose accuracy here; in the low-noise half it sharpened joints
      without it (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"; docs/experiments.md).
    * determinism: noise comes from ``generator`` (or a fresh one seeded with ``seed``; neither = torch's
      global RNG), drawn on the CPU; the same seed gives the same latents.
    * ``x_T``: the starting noise (else drawn).
    * inpainting: ``x0`` (scaled latents of a start image, [B or 1, C, h, w]) and ``mask`` ([h, w],
      [B, 1, h, w]; 1 = keep ``x0`` there). Before each step the kept region is set to ``x0`` noised to
      the current t (as ldm), and the result keeps ``x0`` exactly there.
    * ``x0_fn``: applied to each step's predicted x0 before the update (:func:`ddim_step`), e.g.
      :func:`snap_to_codebook` (ldm's ``quantize_denoised``) or a clamp; None = plain DDIM.
    * ``callback(dict(i, t, x, pred_x0))`` after each step (i counts 0..steps-1).
    The last step goes to ldm's last level, alphas_cumprod[0], not to alpha = 1. The UNet runs in the current
    runtime's precision (:func:`kpnb.core.runtime.current`) when the model is on its device.
    """
    poses = check_poses(poses)
    dev = next(model.parameters()).device
    # the runtime's precision for a model on the runtime's device (a model elsewhere runs as it is)
    amp = current().autocast if dev == current().device else contextlib.nullcontext
    B = poses.shape[0]
    shape = (B, *model.latent_shape)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    rand = lambda: torch.randn(shape, generator=generator).to(dev)  # noqa: E731 - CPU draws: same on any device
    x = rand() if x_T is None else x_T.to(dev).clone()
    if mask is not None:
        if x0 is None:
            raise ValueError("ddim_sample: a mask needs x0 (the latents to keep)")
        mask = torch.as_tensor(mask, dtype=x.dtype, device=dev)
        mask = mask.view(1, 1, *mask.shape[-2:]) if mask.dim() == 2 else mask
        x0 = x0.to(dev, x.dtype)
    model_was_training = model.training
    model.eval()
    cond = model.cond(poses.to(dev))
    uncond = model.cond.null(B) if guidance != 1.0 else None
    abar = model.schedule.alphas_cumprod
    ts = model.schedule.ddim_timesteps(steps)
    lo, hi = check_interval(guidance_interval, model.schedule.T)
    for i, t in enumerate(ts):
        a_t = float(abar[t])
        a_prev = float(abar[ts[i + 1]]) if i + 1 < len(ts) else float(abar[0])
        tt = torch.full((B,), t, dtype=torch.long, device=dev)
        if mask is not None:
            known = model.schedule.add_noise(x0.expand(shape), rand(), tt)
            x = mask * known + (1 - mask) * x
        with amp():  # the UNet in the runtime's precision; the DDIM update in fp32
            e = model.guided_eps(x, tt, cond, uncond, guidance if lo <= t < hi else 1.0).float()
        noise = rand() if ddim_sigma(a_t, a_prev, eta) > 0 else None
        x, pred_x0 = ddim_step(x, e, a_t, a_prev, eta=eta, noise=noise, x0_fn=x0_fn)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": pred_x0})
    if mask is not None:
        x = mask * x0.expand(shape) + (1 - mask) * x
    model.train(model_was_training)
    return x


def check_interval(interval: Sequence[int] | None, T: int) -> tuple[int, int]:
    """``guidance_interval`` as ``(lo, hi)``: None = the whole schedule ``(0, T)``; else two integers
    ``0 <= lo < hi <= T``, or a ValueError naming the field."""
    if interval is None:
        return 0, T
    try:
        lo, hi = (int(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"diffusion.guidance_interval must be [lo, hi] timesteps, got {interval!r}") from None
    if not 0 <= lo < hi <= T:
        raise ValueError(f"diffusion.guidance_interval must satisfy 0 <= lo < hi <= {T}, got {interval!r}")
    return lo, hi


def sample_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A preset's ``diffusion`` section as the DDIM keywords of :func:`ddim_sample`, :func:`sample_images`
    and :func:`pose_fidelity`: ``steps``, ``eta``, ``guidance``, ``guidance_interval``."""
    return {"steps": cfg["sample_steps"], "eta": cfg["eta"], "guidance": cfg["guidance"],
            "guidance_interval": cfg["guidance_interval"]}


# ======================================================================================================
# Images and evaluation
# ======================================================================================================
def sample_images(model: KeypointLDM, vq: nn.Module, poses: Any, *, batch_size: int = 50, seed: int = 0,
                  snap: bool = True, **kw: Any) -> np.ndarray:
    """DDIM (keywords as :func:`ddim_sample`) then decode: uint8 [N, H, W, 3]. Batch k of ``batch_size``
    poses uses ``seed + k``, so results do not depend on what else was sampled before. ``snap`` (default)
    snaps each step's x0 estimate to the VQ codebook (:func:`snap_to_codebook`, ldm's quantize_denoised)
    unless an ``x0_fn`` is given."""
    poses = check_poses(poses)
    if snap and kw.get("x0_fn") is None:
        kw["x0_fn"] = snap_to_codebook(vq, model.scale_factor)
    out = [decode_latents(vq, ddim_sample(model, poses[i:i + batch_size], seed=seed + k, **kw), model.scale_factor)
           for k, i in enumerate(range(0, len(poses), batch_size))]
    return np.concatenate(out)
