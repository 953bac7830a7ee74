"""Keypoint-conditioned latent diffusion: the noise schedule, the model, DDIM sampling, training, evaluation.

The parts, diffusers-style:

* :class:`Schedule` - the DDPM noise schedule, ldm's ``make_beta_schedule("linear")``:
  ``betas = linspace(sqrt(0.0015), sqrt(0.0195), 1000) ** 2`` in float64 (ldm calls it "linear" although it
  is linear in sqrt(beta)). DDIM timesteps as ldm's ``make_ddim_timesteps("uniform")``.
* :func:`prediction_target` / :func:`eps_and_x0` - the one place that converts between what the UNet
  predicts (``"eps"``, the noise, as ldm and the original; or ``"v"``, see :data:`PREDICTIONS`) and the
  noise and clean latent that the sampler and the loss work with.
* :class:`KeypointLDM` - the :class:`kpnb.unet.UNet` plus the :class:`kpnb.conditioning.PoseConditioner`
  (so EMA covers both), the schedule and the latent ``scale_factor``; :func:`make_ldm` builds one.
* :func:`ddim_step` (one update, DDIM paper eq. 12 and 16) and :func:`ddim_sample` (the loop: guidance,
  inpainting, an ``x0_fn`` such as codebook snapping, a per-step callback, a seed).
* :func:`train_ldm` / :func:`load_ldm` (through :func:`kpnb.training.train`), :func:`sample_images`,
  :func:`pose_fidelity` (PCK of generated images, as ``docs/metrics.md`` defines it), :func:`validation_loss`.

Diffusion runs on the VQ model's *pre-quantisation* latents (``vq.encode``) times ``scale_factor``
(1 / std of the training latents, ldm's ``scale_by_std``; the original ran with ldm's default 1.0). A sample
is divided by it, quantised and decoded (:func:`decode_latents`). Settings come from a preset's
``diffusion`` section (:mod:`kpnb.runs`), the one place for their values.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from . import progress as kprogress, runs, training
from .runtime import Method, Runtime, current
from .conditioning import (Cond, PoseConditioner, check_poses, flip_batch, flip_poses, mask_joints,
                           parse_modes)
from .images import to_model, to_uint8
from .pose_estimator import pck, pose_ap, predict
from .unet import SpatialTransformer, UNet, UNetConfig, timestep_embedding, unet_state_from_ldm

__all__ = ["ARCH_KEYS", "PREDICTIONS", "TRAIN_KEYS", "KeypointLDM", "Schedule", "SpatialTransformer", "UNet",
           "UNetConfig", "check_interval", "ddim_sample", "ddim_sigma", "ddim_step", "decode_latents",
           "encode_latents", "eps_and_x0", "ldm_from_settings", "load_ldm", "make_ldm", "model_stats", "original_ldm",
           "pose_fidelity", "prediction_target", "sample_images", "sample_kwargs", "scale_factor_of",
           "snap_to_codebook", "timestep_embedding", "train_ldm", "unet_state_from_ldm", "validation_loss"]


# ======================================================================================================
# The noise schedule
# ======================================================================================================
class Schedule:
    """DDPM schedule of ``T`` steps with ldm's "linear" betas (linear in sqrt(beta), float64).

    ``add_noise(x0, noise, t)`` is q(x_t | x_0); ``ddim_timesteps(steps)`` the DDIM sub-sequence."""

    def __init__(self, T: int = 1000, beta_start: float = 0.0015, beta_end: float = 0.0195):
        self.T, self.beta_start, self.beta_end = T, beta_start, beta_end
        # always on the CPU in float64 (also when a model is built under a device context)
        self.betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64, device="cpu") ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, 0)

    def config(self) -> dict[str, Any]:
        return {"T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end}

    def abar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """alphas_cumprod[t] shaped [B, 1, 1, 1] in ``like``'s dtype/device."""
        return self.alphas_cumprod.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = self.abar(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def ddim_timesteps(self, steps: int) -> list[int]:
        """``steps`` descending timesteps, ldm's uniform spacing ``k * (T // steps) + 1`` (k < steps; the same
        as ldm's ``range(0, T, T // steps) + 1`` when steps divides T), capped at T - 1."""
        if not 1 <= steps <= self.T:
            raise ValueError(f"DDIM steps must be 1..{self.T}, got {steps}")
        ts = sorted({min(k * (self.T // steps) + 1, self.T - 1) for k in range(steps)})
        return ts[::-1]


# ======================================================================================================
# What the UNet predicts (k-diffusion's external.py wrappers, in two functions)
# ======================================================================================================
#: What the UNet can be trained to predict, at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps:
#: "eps", the noise (ldm and the original project); or "v" = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans &
#: Ho 2022). An eps model is ill-conditioned at high noise: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
#: multiplies an error in eps by up to 1 / sqrt(abar) (about 70 at DDIM's first step, t = 981); v keeps both
#: ends scaled. Measurements of the two: docs/experiments.md.
PREDICTIONS = ("eps", "v")


def prediction_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to output for x_t = sqrt(abar) x0 + sqrt(1 - abar) noise: the noise, or v."""
    if prediction == "eps":
        return noise
    return abar.sqrt() * noise - (1 - abar).sqrt() * x0


def eps_and_x0(prediction: str, out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's output ``out`` at ``x_t`` as (predicted noise, predicted x0); the inverse of
    :func:`prediction_target`. ``abar`` = alphas_cumprod[t], broadcastable to ``x_t``."""
    if prediction == "eps":
        return out, (x_t - (1 - abar).sqrt() * out) / abar.sqrt()
    return abar.sqrt() * out + (1 - abar).sqrt() * x_t, abar.sqrt() * x_t - (1 - abar).sqrt() * out


# ======================================================================================================
# UNet + pose conditioning + latent scale
# ======================================================================================================
class KeypointLDM(nn.Module):
    """The trainable whole: ``unet`` + ``cond`` (a PoseConditioner), plus ``scale_factor`` and the schedule.

    ``eps(x_t, t, cond)`` predicts the noise whatever the UNet's target (``prediction``), so the sampler
    does not care which; ``guided_eps`` adds classifier-free guidance; ``loss(z0, poses, ...)`` is the MSE
    of the UNet's target. Latents here are already scaled."""

    def __init__(self, unet_cfg: UNetConfig, cond: PoseConditioner, latent_shape: Sequence[int],
                 scale_factor: float = 1.0, schedule: Schedule | None = None, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        self.cond = cond
        want_in = latent_shape[0] + cond.concat_channels
        if unet_cfg.in_channels != want_in or unet_cfg.context_dim != cond.context_dim:
            raise ValueError(f"UNet in_channels/context_dim ({unet_cfg.in_channels}, {unet_cfg.context_dim}) do not "
                             f"fit latent {tuple(latent_shape)} + conditioning {cond.modes} ({want_in}, "
                             f"{cond.context_dim}); build it with make_ldm()")
        self.unet = UNet(unet_cfg)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        self.scale_factor = float(scale_factor)
        self.schedule = schedule or Schedule()

    def config(self) -> dict[str, Any]:
        return {"unet": asdict(self.unet.cfg), "cond": self.cond.config(),
                "latent_shape": list(self.latent_shape), "scale_factor": self.scale_factor,
                "schedule": self.schedule.config(), "prediction": self.prediction}

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "KeypointLDM":
        return cls(UNetConfig(**cfg["unet"]), PoseConditioner(**cfg["cond"]), cfg["latent_shape"],
                   cfg["scale_factor"], Schedule(**cfg["schedule"]), cfg.get("prediction", "eps"))

    def net(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The UNet's raw output: epsilon or v, as ``prediction`` says."""
        inp = x if cond.concat is None else torch.cat([x, cond.concat.to(x.dtype)], 1)
        return self.unet(inp, t, cond.context)

    def eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """The predicted noise at ``x`` = x_t (:func:`eps_and_x0` of the UNet's output)."""
        return eps_and_x0(self.prediction, self.net(x, t, cond), x, self.schedule.abar(t, x))[0]

    def guided_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Cond, uncond: Cond | None,
                   guidance: float) -> torch.Tensor:
        """eps_u + s (eps_c - eps_u). s = 1 runs only the conditional branch, s = 0 only the unconditional
        one; otherwise both go through the UNet as one doubled batch."""
        if guidance == 1.0 or uncond is None:
            return self.eps(x, t, cond)
        if guidance == 0.0:
            return self.eps(x, t, uncond)
        e_c, e_u = self.eps(torch.cat([x, x]), torch.cat([t, t]), cond.cat(uncond)).chunk(2)
        return e_u + guidance * (e_c - e_u)

    def draw(self, shape: Sequence[int], p_uncond: float, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The per-sample random draws of :meth:`loss` for latents of ``shape`` (on the CPU): timesteps, noise,
        and which poses are dropped (probability ``p_uncond``)."""
        B = shape[0]
        t = torch.randint(0, self.schedule.T, (B,), generator=generator)
        noise = torch.randn(tuple(shape), generator=generator)
        return t, noise, torch.rand(B, generator=generator) < p_uncond

    def loss(self, z0: torch.Tensor, poses: torch.Tensor, *, p_uncond: float = 0.1, min_snr: float = 0.0,
             generator: torch.Generator | None = None,
             draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """MSE between the UNet's output and its target (:func:`prediction_target`) at uniform random
        timesteps; each sample's pose is dropped (replaced by the learned nulls) with probability ``p_uncond``.
        ``min_snr`` > 0 weights each sample by min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1)
        for v (Min-SNR-gamma, Hang et al. 2023; the same weight in x0 terms for both), so that the many nearly
        noise-free timesteps do not dominate the loss. 0 = ldm's plain mean (the original). ``draws``: the
        :meth:`draw` of this batch, made beforehand (training makes them for the global batch); None = drawn
        here from ``generator``."""
        dev = z0.device
        t, noise, drop = (d.to(dev) for d in (draws or self.draw(z0.shape, p_uncond, generator)))
        cond = self.cond(poses, drop)
        a = self.schedule.abar(t, z0)
        target = prediction_target(self.prediction, z0, noise, a)
        err = (self.net(self.schedule.add_noise(z0, noise, t), t, cond) - target).square().mean((1, 2, 3))
        if min_snr > 0:
            a = a.flatten()
            snr = a / (1 - a)
            err = err * snr.clamp(max=min_snr) / (snr if self.prediction == "eps" else snr + 1)
        return err.mean()


def make_ldm(modes: str | Sequence[str], latent_shape: Sequence[int], *, base: int = 64,
             mults: Sequence[int] = (1, 2, 2), num_res_blocks: int = 2, attn_ds: Sequence[int] = (2,),
             heads: int = 4, token_dim: int = 64, self_attn: bool = True, dropout: float = 0.0,
             sigma: float = 1.0, pos_freqs: int = 0, scale_factor: float = 1.0, T: int = 1000,
             beta_start: float = 0.0015, beta_end: float = 0.0195, prediction: str = "eps") -> KeypointLDM:
    """A KeypointLDM for conditioning ``modes`` on latents of ``latent_shape`` = (C, h, w): the UNet's
    input channels and context width follow from the modes. ``prediction``: the UNet's target, "eps"
    (ldm, the original) or "v" (see :data:`PREDICTIONS`)."""
    C, h, w = latent_shape
    if h != w:
        raise ValueError(f"square latents expected, got {tuple(latent_shape)}")
    cond = PoseConditioner(parse_modes(modes), latent_size=h, token_dim=token_dim, sigma=sigma)
    cfg = UNetConfig(in_channels=C + cond.concat_channels, out_channels=C, base=base, mults=tuple(mults),
                     num_res_blocks=num_res_blocks, attn_ds=tuple(attn_ds), heads=heads,
                     context_dim=cond.context_dim, self_attn=self_attn, dropout=dropout, pos_freqs=pos_freqs)
    return KeypointLDM(cfg, cond, latent_shape, scale_factor, Schedule(T, beta_start, beta_end), prediction)


#: The keys of a preset's ``diffusion`` section that shape the model (:func:`make_ldm`'s keywords).
ARCH_KEYS = ("base", "mults", "num_res_blocks", "attn_ds", "heads", "token_dim", "self_attn", "dropout", "sigma",
             "prediction")


def ldm_from_settings(cfg: Mapping[str, Any], modes: str | Sequence[str], latent_shape: Sequence[int], *,
                      scale_factor: float = 1.0) -> KeypointLDM:
    """:func:`make_ldm` with the model keys (:data:`ARCH_KEYS`) of a preset's ``diffusion`` section."""
    return make_ldm(modes, latent_shape, scale_factor=scale_factor, **{k: cfg[k] for k in ARCH_KEYS})


def original_ldm() -> KeypointLDM:
    """The original project's model, ready for its released weights (:func:`unet_state_from_ldm` into
    ``.unet``; :func:`kpnb.original.load_original_ldm` reads the released file whole): grid conditioning
    (context [B, 1, 17]), 64x64x3 f4 latents, ldm's default scale_factor 1.0 (the original config sets no
    ``scale_by_std``), base 160, mults 1,2,3,4, attention at 1/2, 1/4, 1/8, 8 heads. Its learned null pose is
    new (the original had no guidance): train it, or sample at guidance 1."""
    m = make_ldm("grid", (3, 64, 64), base=160, mults=(1, 2, 3, 4), num_res_blocks=2, attn_ds=(2, 4, 8), heads=8,
                 scale_factor=1.0)
    assert m.unet.cfg == UNetConfig.original()
    return m


# ======================================================================================================
# DDIM sampling
# ======================================================================================================
# Notation of the DDIM paper (Song, Meng & Ermon 2021): its alpha_t is kpnb's alphas_cumprod[t] ("abar",
# ``a_t`` below); a_prev is that of the next, less noisy, timestep of the DDIM sub-sequence.
def ddim_sigma(a_t: float, a_prev: float, eta: float) -> float:
    """Eq. 16: sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev). eta = 0 is
    deterministic DDIM, eta = 1 the DDPM posterior's variance."""
    return eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, *, eta: float = 0.0,
              noise: torch.Tensor | None = None, x0_fn: Callable[[torch.Tensor], torch.Tensor] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update from ``x_t`` with predicted noise ``eps`` to the previous timestep (eq. 12):

        x_prev = sqrt(a_prev) * x0  +  sqrt(1 - a_prev - sigma^2) * eps  +  sigma * noise

    Returns (x_prev, predicted x0). ``noise`` (standard normal, x_t's shape) is needed when sigma > 0.
    ``x0_fn`` replaces the predicted x0 (e.g. :func:`snap_to_codebook`) and eps is recomputed to match it."""
    # eq. 12, "predicted x0": (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    pred_x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if x0_fn is not None:
        pred_x0 = x0_fn(pred_x0)
        eps = (x_t - math.sqrt(a_t) * pred_x0) / math.sqrt(1 - a_t)  # the noise consistent with the new x0
    sigma = ddim_sigma(a_t, a_prev, eta)  # eq. 16
    # eq. 12: sqrt(a_prev) * "predicted x0" + "direction pointing to x_t" (clamped at 0 against rounding)
    x_prev = math.sqrt(a_prev) * pred_x0 + math.sqrt(max(1 - a_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:  # eq. 12, "random noise"
        if noise is None:
            raise ValueError(f"ddim_step: eta {eta} gives sigma {sigma:.3g} > 0, so it needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


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
    runtime's precision (:func:`kpnb.runtime.current`) when the model is on its device.
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
# Latents <-> images through the VQ model
# ======================================================================================================
@torch.no_grad()
def encode_latents(vq: nn.Module, images: Any, batch_size: int = 64) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> the VQ model's pre-quantisation latents [N, C, h, w] (unscaled). The rows
    are read one batch at a time, as :func:`latent_cache` reads them (a memory-mapped subset stays on disk)."""
    dev = next(vq.parameters()).device
    return torch.cat([vq.encode(to_model(images[i:i + batch_size]).to(dev)).cpu()
                      for i in range(0, len(images), batch_size)])


def snap_to_codebook(vq: nn.Module, scale_factor: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``x0_fn`` for :func:`ddim_sample`: replace each predicted x0 by its nearest codebook vectors
    (ldm's ``quantize_denoised``), keeping the sample on latents the decoder knows."""
    @torch.no_grad()
    def snap(x0: torch.Tensor) -> torch.Tensor:
        dev = next(vq.parameters()).device
        return vq.quantize(x0.to(dev) / scale_factor)[0].to(x0.device) * scale_factor
    return snap


def scale_factor_of(latents: torch.Tensor | np.ndarray, chunk: int = 4096) -> float:
    """1 / std of the training latents (ldm's ``scale_by_std`` over all of them), so the diffusion sees
    unit-variance data. Summed in float64 chunks: a memory-mapped cache is read once, never held."""
    n, s1, s2 = 0, 0.0, 0.0
    for i in range(0, len(latents), chunk):
        c = np.asarray(latents[i:i + chunk], dtype=np.float64)
        n, s1, s2 = n + c.size, s1 + c.sum(), s2 + np.square(c).sum()
    if n < 2:
        raise ValueError("scale_factor_of: need at least two latent values")
    return float(1.0 / math.sqrt((s2 - s1 * s1 / n) / (n - 1)))


LATENT_CACHE_VERSION = 1


def latent_cache(vq: nn.Module, images: np.ndarray, path: str | Path, *, identity: Mapping[str, Any],
                 batch_size: int = 64, progress: bool = True, runtime: Runtime | None = None) -> np.ndarray:
    """The pre-quantisation latents of ``images`` and of their mirror images, ``[N, 2, C, h, w]`` float32
    (``[:, 0]`` as given, ``[:, 1]`` encoded from the horizontally flipped image), memory-mapped from the
    ``.npy`` at ``path``. Written once (to a temporary file, then renamed; the JSON sidecar with
    ``identity`` - which VQ checkpoint, which images - last); a cache whose sidecar names another identity
    is rebuilt. Under several ranks rank 0 writes it and the others wait, then read it."""
    rt = runtime or current()
    path = Path(path)
    side = path.with_suffix(".json")
    want = {"version": LATENT_CACHE_VERSION, "n": int(len(images)), **json.loads(json.dumps(dict(identity)))}
    fresh = side.exists() and path.exists() and json.loads(side.read_text()) == want
    if not fresh and rt.is_main:
        side.unlink(missing_ok=True)
        dev = next(vq.parameters()).device
        tmp = path.with_name(f".{path.name}.tmp")
        shape = (len(images), 2, *vq.encode(to_model(images[:1]).to(dev)).shape[1:])
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        with torch.no_grad():
            for i in kprogress.bar(range(0, len(images), batch_size), desc=f"latents {path.stem}",
                                   disable=not progress, unit_label="batch"):
                x = to_model(images[i:i + batch_size]).to(dev)
                out[i:i + len(x), 0] = vq.encode(x).float().cpu().numpy()
                out[i:i + len(x), 1] = vq.encode(x.flip(-1)).float().cpu().numpy()
        out.flush()
        del out
        os.replace(tmp, path)
        runs.write_json(side, want)
    rt.barrier()
    return np.load(path, mmap_mode="r")


@torch.no_grad()
def decode_latents(vq: nn.Module, z: torch.Tensor, scale_factor: float, quantize: bool = True) -> np.ndarray:
    """Scaled latents -> uint8 images [B, H, W, 3]: divide by ``scale_factor``, quantise, decode."""
    dev = next(vq.parameters()).device
    h = z.to(dev) / scale_factor
    if quantize:
        h = vq.quantize(h)[0]
    return to_uint8(vq.decode(h))


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


def train_ldm(latents: torch.Tensor, poses: Any, cfg: Mapping[str, Any], ckpt_dir: str | Path,
              modes: str | Sequence[str], *, scale_factor: float | None = None, progress: bool = True,
              resume: bool = True, on_log: Callable[[dict[str, float]], None] | None = None,
              runtime: Runtime | None = None, rows: Any = None) -> tuple[KeypointLDM, Any]:
    """Train a KeypointLDM on unscaled pre-quantisation ``latents`` [N, C, h, w] and ``poses`` [N, 17, 3].
    ``rows``: train on these rows only (e.g. a stricter subset), read from ``latents`` as it is (a memory map
    stays one), with the same scale factor unless ``scale_factor`` is given.

    ``cfg``: a preset's ``diffusion`` section (every key of :data:`ARCH_KEYS` and :data:`TRAIN_KEYS`). Each
    step: a batch by :func:`kpnb.training.batch_indices`, half the samples flipped together with their poses
    (``flip``), joints masked as in a person's annotation (``joint_drop``, :func:`kpnb.conditioning.mask_joints`),
    per-sample conditioning dropout (``p_uncond``), AdamW (no weight decay) with warm-up, then a
    cosine or constant learning rate (``lr_schedule``), EMA of the weights. All randomness of step s comes from
    ``seeded_generator(seed, s)`` and is drawn for the whole global batch in ``batch_fn``, so a resumed run
    matches an uninterrupted one and N ranks (``runtime``, under torchrun) train what one process would.
    ``scale_factor``: None = 1/std of ``latents``. Returns (the EMA model in eval mode, the
    :class:`kpnb.training.TrainResult`)."""
    rt = runtime or current()
    missing = [k for k in ARCH_KEYS + TRAIN_KEYS if k not in cfg]
    if missing:
        raise KeyError(f"train_ldm: the diffusion settings lack {', '.join(missing)}; pass a preset's section, "
                       f"kpnb.runs.preset_config(name)['diffusion']")
    if cfg["lr_schedule"] not in ("cosine", "constant"):
        raise ValueError(f"diffusion.lr_schedule must be 'cosine' or 'constant', got {cfg['lr_schedule']!r}")
    modes = parse_modes(modes)
    mirrored = latents.ndim == 5  # a latent_cache: [N, 2, C, h, w], the flipped image's own latents at [:, 1]
    if not mirrored:
        latents = torch.as_tensor(latents)
    poses = check_poses(poses, name="train poses")
    if len(latents) != len(poses):
        raise ValueError(f"train_ldm: {len(latents)} latents but {len(poses)} poses")
    sf = scale_factor_of(latents[:, 0] if mirrored else latents) if scale_factor is None else float(scale_factor)
    rows = np.arange(len(latents)) if rows is None else np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or not len(rows) or rows.min() < 0 or rows.max() >= len(latents):
        raise ValueError(f"train_ldm: rows must be a non-empty list of indices into the {len(latents)} latents")
    poses = poses[torch.as_tensor(rows)]
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
    loss_of = rt.ddp(Method(model, "loss"))  # DDP (several ranks) and torch.compile (runtime.compile) go here

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

    # "steps" at the top level: kpnb.training allows resuming with more (or fewer) steps, nothing else changed
    config = {"ldm": model.config(), "train": _train_record(cfg), "steps": steps, "n_train": len(rows)}
    result = training.train({"model": model, "ema": ema}, {"opt": opt}, step_fn, batch_fn, steps=steps,
                            ckpt_dir=ckpt_dir, config=config, batch_size=bs, ckpt_every=int(cfg["ckpt_every"]),
                            seed=seed, desc=f"ldm[{'+'.join(modes)}]", resume=resume, progress=progress,
                            on_log=on_log, runtime=rt)
    return ema.eval(), result


def load_ldm(ckpt_dir: str | Path, use_ema: bool = True) -> KeypointLDM:
    """The model of a :func:`train_ldm` checkpoint folder (or file), EMA weights by default, in eval mode."""
    return training.load_trained(ckpt_dir, "ldm", KeypointLDM.from_config, module="ema" if use_ema else "model",
                                 what="kpnb diffusion")


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


def pose_fidelity(model: KeypointLDM, vq: nn.Module, estimator: nn.Module, poses: Any, *,
                  ceiling: Mapping[str, float] | None = None, batch_size: int = 50, seed: int = 0,
                  sampler: Callable[..., np.ndarray] | None = None, target: Any = None,
                  **kw: Any) -> tuple[np.ndarray, dict[str, float]]:
    """Generate one image per pose, estimate its pose, and score it against the conditioning pose, or against
    ``target`` [N, 17, 3] where given (the annotation a completed pose came from:
    :func:`kpnb.keypoints.complete_poses`; ``docs/metrics.md``): returns (images, metrics) with the
    :func:`kpnb.pose_estimator.pck` and :func:`kpnb.pose_estimator.pose_ap` keys, ``sample_images_per_s`` and,
    given the estimator's ``ceiling`` (:func:`kpnb.pose_estimator.ceiling`'s dict), ``<key>.ratio`` = number /
    ceiling for the PCK keys and AP. ``sampler(model, vq, poses, batch_size=, seed=, **kw) -> uint8 images``:
    another generator to score (e.g. :func:`kpnb.transformer.sample_images`); None = :func:`sample_images`."""
    poses = check_poses(poses)
    t0 = time.perf_counter()
    images = (sampler or sample_images)(model, vq, poses, batch_size=batch_size, seed=seed, **kw)
    secs = time.perf_counter() - t0
    truth = poses if target is None else check_poses(target, name="pose_fidelity target")
    if truth.shape != poses.shape:
        raise ValueError(f"pose_fidelity: target {list(truth.shape)} does not match the poses {list(poses.shape)}")
    pred, scores = predict(estimator, images, with_scores=True)
    metrics: dict[str, float] = dict(pck(pred, truth))
    metrics.update({k: v for k, v in pose_ap(pred, truth, scores).items() if k != "n_images"})
    metrics["sample_images_per_s"] = len(images) / secs
    if ceiling:
        for k in list(metrics):
            if (k.startswith("pck@") or k == "ap") and ceiling.get(k):
                metrics[f"{k}.ratio"] = metrics[k] / ceiling[k]
    return images, metrics


def model_stats(model: nn.Module, example: Sequence[torch.Tensor]) -> dict[str, float]:
    """Parameters (millions) and forward GFLOP per sample (torch's FLOP counter, one multiply-add = 2 FLOP)."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*example)
    n = example[0].shape[0]
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflop_per_sample": fc.get_total_flops() / n / 1e9}


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
