"""DDIM sampling of the keypoint LDM, in k-diffusion's shape: one short loop over a *model function*.

* :func:`ddim_loop` - the loop: ``model_fn(x, t) -> eps`` and :func:`kpnb.diffusion.schedule.ddim_step` at each
  of the DDIM levels, a per-step callback. :func:`dpmpp_2m_loop` - the same levels by DPM-Solver++(2M), the
  deterministic second-order multistep solver (``solver="dpmpp_2m"`` of :class:`DDIMSettings`).
* small wrappers that build the model function or act on the loop's x: :func:`guided` (classifier-free
  guidance within an interval of timesteps), :func:`in_runtime_precision` (autocast where the model is called),
  :func:`known_region` (inpainting's blend). ``x0_fn`` (e.g. :func:`kpnb.diffusion.ldm.snap_to_codebook`)
  goes to the step as it is.
* :func:`ddim_sample` - poses in, latents out, its settings checked against :class:`DDIMSettings`;
  :func:`sample_images` decodes them; :func:`ddim_snapshots` is the row of a run's x0 estimates the notebooks draw.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kpnb.core.runtime import current
from kpnb.diffusion.ldm import KeypointLDM, decode_latents, snap_to_codebook
from kpnb.diffusion.schedule import Schedule, ddim_sigma, ddim_step
from kpnb.poses.conditioning import check_poses

#: ``model_fn(x_t, t) -> predicted noise`` (t: the integer timestep, the same for the whole batch).
ModelFn = Callable[[torch.Tensor, int], torch.Tensor]
#: ``x_fn(x_t, t) -> x_t``, applied before the model sees x_t (inpainting's known-region blend).
XFn = Callable[[torch.Tensor, int], torch.Tensor]
X0Fn = Callable[[torch.Tensor], torch.Tensor]


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (the same numbers on any device), then moved to ``device``."""
    return torch.randn(tuple(shape), generator=generator).to(device)


# ======================================================================================================
# The loop
# ======================================================================================================
@torch.no_grad()
def ddim_loop(model_fn: ModelFn, x: torch.Tensor, levels: Sequence[tuple[int, float, float]], *, eta: float = 0.0,
              x0_fn: X0Fn | None = None, x_fn: XFn | None = None,
              callback: Callable[[dict[str, Any]], None] | None = None,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM from ``x`` = x_T through ``levels`` (``(t, a_t, a_prev)`` per step, :meth:`Schedule.ddim_levels`).

    Each step: ``x_fn`` (if given) replaces x_t, ``model_fn`` predicts the noise, and :func:`ddim_step` moves to
    the next level (``eta``, and ``x0_fn`` applied to the x0 estimate). Noise for eta > 0 comes from
    ``generator``, drawn on the CPU. ``callback(dict(i, t, x, pred_x0))`` after each step (i counts from 0)."""
    for i, (t, a_t, a_prev) in enumerate(levels):
        if x_fn is not None:
            x = x_fn(x, t)
        eps = model_fn(x, t)
        noise = _randn(x.shape, generator, x.device) if ddim_sigma(a_t, a_prev, eta) > 0 else None
        x, pred_x0 = ddim_step(x, eps, a_t, a_prev, eta=eta, noise=noise, x0_fn=x0_fn)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": pred_x0})
    return x


@torch.no_grad()
def dpmpp_2m_loop(model_fn: ModelFn, x: torch.Tensor, levels: Sequence[tuple[int, float, float]], *,
                  x0_fn: X0Fn | None = None, x_fn: XFn | None = None,
                  callback: Callable[[dict[str, Any]], None] | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2: deterministic, data prediction, second
    order, one model call a step) from ``x`` = x_T through the DDIM ``levels``; ``x_fn``, ``x0_fn`` (on each x0
    estimate) and ``callback`` as :func:`ddim_loop`.

    With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma), step i from level a_t to a_prev:
    x0_i = (x_t - sigma_t eps) / alpha_t, h_i = lambda_prev - lambda_t, r_i = h_{i-1} / h_i and

        D_i    = (1 + 1 / (2 r_i)) x0_i - 1 / (2 r_i) x0_{i-1}
        x_prev = (sigma_prev / sigma_t) x_t - alpha_prev (exp(-h_i) - 1) D_i

    The first step takes D_0 = x0_0 (first order: DDIM with eta 0), and so does the last one below 15 steps, where
    it is long in lambda on these uniform timesteps (2.1 after 0.5 at 10 steps) and an extrapolation over it
    overshoots; a last step to a_prev = 1 (sigma 0) gives x0 itself. That is diffusers'
    DPMSolverMultistepScheduler with its default lower_order_final, and final_sigmas_type="sigma_min": the last
    level is alphas_cumprod[0], as in DDIM (tests/diffusion/test_multistep.py)."""
    x0_last = h_last = None
    for i, (t, a_t, a_prev) in enumerate(levels):
        if x_fn is not None:
            x = x_fn(x, t)
        eps = model_fn(x, t)
        pred_x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if x0_fn is not None:
            pred_x0 = x0_fn(pred_x0)
        if a_prev >= 1:  # sigma_prev = 0, lambda_prev = inf: the first-order step lands on x0
            x, h = pred_x0, None
        else:
            h = 0.5 * math.log(a_prev / (1 - a_prev)) - 0.5 * math.log(a_t / (1 - a_t))
            first_order = x0_last is None or (i == len(levels) - 1 and len(levels) < 15)
            d = pred_x0 if first_order else pred_x0 + h / (2 * h_last) * (pred_x0 - x0_last)
            x = math.sqrt((1 - a_prev) / (1 - a_t)) * x - math.sqrt(a_prev) * math.expm1(-h) * d
        x0_last, h_last = pred_x0, h
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "pred_x0": pred_x0})
    return x


# ======================================================================================================
# Model functions and the known-region blend
# ======================================================================================================
def guided(model: KeypointLDM, poses: torch.Tensor, guidance: float = 1.0,
           interval: Sequence[int] | None = None) -> ModelFn:
    """The model function of ``model`` for ``poses`` (on the model's device) under classifier-free guidance
    (:meth:`KeypointLDM.guided_eps`): scale ``guidance`` at the timesteps ``lo <= t < hi`` of ``interval``
    (:func:`check_interval`), the conditional branch alone (one UNet pass) at the others.

    Guidance at high noise cost FID for little pose accuracy here; in the low-noise half it sharpened joints
    without it (Kynkaanniemi et al. 2024, "Applying guidance in a limited interval"; docs/experiments.md)."""
    B, dev = len(poses), poses.device
    cond = model.cond(poses)
    uncond = model.cond.null(B) if guidance != 1.0 else None
    lo, hi = check_interval(interval, model.schedule.T)

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((B,), t, dtype=torch.long, device=dev)
        return model.guided_eps(x, tt, cond, uncond, guidance if lo <= t < hi else 1.0)
    return eps


def in_runtime_precision(model_fn: ModelFn, device: torch.device) -> ModelFn:
    """``model_fn`` under the current runtime's autocast (:func:`kpnb.core.runtime.current`) when ``device`` is
    the runtime's (a model elsewhere runs as it is); its output in fp32, so the DDIM update runs in fp32."""
    amp = current().autocast if device == current().device else contextlib.nullcontext

    def eps(x: torch.Tensor, t: int) -> torch.Tensor:
        with amp():
            return model_fn(x, t).float()
    return eps


def known_region(schedule: Schedule, x0: torch.Tensor, mask: torch.Tensor,
                 generator: torch.Generator | None = None) -> XFn:
    """Inpainting's ``x_fn`` (as ldm's DDIM sampler): where ``mask`` is 1, x_t becomes ``x0`` noised to t
    (q(x_t | x0), fresh noise from ``generator``); elsewhere it stays as the sampler has it."""
    def blend(x: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((len(x),), t, dtype=torch.long, device=x.device)
        known = schedule.add_noise(x0.expand(x.shape), _randn(x.shape, generator, x.device), tt)
        return mask * known + (1 - mask) * x
    return blend


# ======================================================================================================
# Poses in, latents out
# ======================================================================================================
#: How :func:`ddim_sample` steps through the DDIM levels: :func:`ddim_loop` or :func:`dpmpp_2m_loop`.
SOLVERS = ("ddim", "dpmpp_2m")


@dataclass(frozen=True)
class DDIMSettings:
    """The settings of :func:`ddim_sample` (besides ``seed`` and ``callback``).

    * ``solver``: ``"ddim"`` (:func:`ddim_loop`) or ``"dpmpp_2m"`` (:func:`dpmpp_2m_loop`, deterministic: eta
      must be 0); either over the same ``steps`` timesteps.
    * ``steps``, ``eta`` (0 = deterministic DDIM, 1 = DDPM-like), ``guidance`` (classifier-free scale:
      1 = conditional only, 0 = unconditional, >1 pushes towards the pose), ``guidance_interval`` (``[lo, hi]``
      timesteps where guidance applies, None = all; :func:`guided`).
    * ``generator``: where the noise comes from (else one seeded with ``seed``; neither = torch's global RNG).
    * ``x_T``: the starting noise (else drawn).
    * inpainting: ``x0`` (scaled latents of a start image, [B or 1, C, h, w]) and ``mask`` ([h, w] or
      [B, 1, h, w]; 1 = keep ``x0`` there): :func:`known_region` before each step, and the result keeps
      ``x0`` exactly there.
    * ``x0_fn``: applied to each step's x0 estimate (:func:`ddim_step`), e.g. :func:`snap_to_codebook`
      (ldm's quantize_denoised) or a clamp; None = plain DDIM."""
    steps: int = 50
    eta: float = 0.0
    solver: str = "ddim"
    guidance: float = 1.0
    guidance_interval: Sequence[int] | None = None
    generator: torch.Generator | None = None
    x_T: torch.Tensor | None = None
    x0: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    x0_fn: X0Fn | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"DDIM setting solver (diffusion.solver) must be one of {', '.join(map(repr, SOLVERS))}, "
                             f"got {self.solver!r}")
        if self.solver == "dpmpp_2m" and self.eta != 0:
            raise ValueError(f"DDIM setting eta must be 0 with solver 'dpmpp_2m' (a deterministic solver), "
                             f"got {self.eta}")

    @classmethod
    def of(cls, settings: Mapping[str, Any], caller: str = "ddim_sample") -> "DDIMSettings":
        """The settings from keywords; a TypeError names any that is not one of them."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(settings) - set(names))
        if unknown:
            raise TypeError(f"{caller}() got unknown DDIM setting(s) {', '.join(map(repr, unknown))}; "
                            f"the settings are {', '.join(names)}")
        return cls(**settings)


@torch.no_grad()
def ddim_sample(model: KeypointLDM, poses: Any, *, seed: int | None = None,
                callback: Callable[[dict[str, Any]], None] | None = None, **settings: Any) -> torch.Tensor:
    """Sample scaled latents ``[B, C, h, w]`` for ``poses`` (anything :func:`check_poses` takes) by DDIM
    (:func:`ddim_loop`, or :func:`dpmpp_2m_loop` for ``solver="dpmpp_2m"``) with the keyword ``settings`` of
    :class:`DDIMSettings`. The same ``seed`` gives the same latents (noise drawn on the CPU).
    ``callback(dict(i, t, x, pred_x0))`` after each step. The model runs in eval mode, in the current runtime's
    precision when it is on the runtime's device."""
    s = DDIMSettings.of(settings)
    poses = check_poses(poses)
    dev = next(model.parameters()).device
    shape = (len(poses), *model.latent_shape)
    generator = s.generator
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    x = _randn(shape, generator, dev) if s.x_T is None else s.x_T.to(dev).clone()
    x0 = mask = x_fn = None
    if s.mask is not None:
        if s.x0 is None:
            raise ValueError("ddim_sample: a mask needs x0 (the latents to keep)")
        mask = torch.as_tensor(s.mask, dtype=x.dtype, device=dev)
        mask = mask.view(1, 1, *mask.shape[-2:]) if mask.dim() == 2 else mask
        x0 = s.x0.to(dev, x.dtype)
        x_fn = known_region(model.schedule, x0, mask, generator)
    was_training = model.training
    model.eval()
    try:
        model_fn = in_runtime_precision(guided(model, poses.to(dev), s.guidance, s.guidance_interval), dev)
        levels = model.schedule.ddim_levels(s.steps)
        if s.solver == "dpmpp_2m":
            x = dpmpp_2m_loop(model_fn, x, levels, x0_fn=s.x0_fn, x_fn=x_fn, callback=callback)
        else:
            x = ddim_loop(model_fn, x, levels, eta=s.eta, x0_fn=s.x0_fn, x_fn=x_fn, callback=callback,
                          generator=generator)
    finally:
        model.train(was_training)
    if mask is not None:
        x = mask * x0.expand(shape) + (1 - mask) * x
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
    and :func:`pose_fidelity`: ``steps``, ``solver``, ``eta``, ``guidance``, ``guidance_interval``."""
    return {"steps": cfg["sample_steps"], "solver": cfg["solver"], "eta": cfg["eta"], "guidance": cfg["guidance"],
            "guidance_interval": cfg["guidance_interval"]}


# ======================================================================================================
# Images
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


def snapshot_steps(steps: int, n_snapshots: int) -> list[int]:
    """``n_snapshots`` step indices (0-based) evenly spaced over a run of ``steps``, the first and last among
    them (only the last for one snapshot)."""
    if not 1 <= n_snapshots <= steps:
        raise ValueError(f"n_snapshots must be 1..{steps} (the DDIM steps), got {n_snapshots}")
    if n_snapshots == 1:
        return [steps - 1]
    return [round(k * (steps - 1) / (n_snapshots - 1)) for k in range(n_snapshots)]


def ddim_snapshots(model: KeypointLDM, vq: nn.Module, pose: Any, *, n_snapshots: int = 8, seed: int = 0,
                   **settings: Any) -> np.ndarray:
    """DDIM's running estimate of the clean image for one ``pose``, decoded: uint8 [n_snapshots, H, W, 3], the
    x0 estimate (``pred_x0``) at the steps :func:`snapshot_steps` names, the last one the final sample itself.
    ``settings`` as :func:`ddim_sample` (no codebook snapping unless an ``x0_fn`` is given)."""
    poses = check_poses(pose)
    if len(poses) != 1:
        raise ValueError(f"ddim_snapshots: one pose, got {len(poses)}")
    at = snapshot_steps(DDIMSettings.of(settings, "ddim_snapshots").steps, n_snapshots)
    kept: dict[int, torch.Tensor] = {}

    def keep(d: dict[str, Any]) -> None:
        if d["i"] in at:
            kept[d["i"]] = d["pred_x0"]
    kept[at[-1]] = ddim_sample(model, poses, seed=seed, callback=keep, **settings)
    return decode_latents(vq, torch.cat([kept[i] for i in at]), model.scale_factor)
