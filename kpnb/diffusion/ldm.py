"""Keypoint-conditioned latent diffusion: the noise schedule, the model, DDIM sampling, training, evaluation.

The parts, diffusers-style:

* :class:`Schedule` - the DDPM noise schedule, ldm's ``make_beta_schedule("linear")``:
  ``betas = linspace(sqrt(0.0015), sqrt(0.0195), 1000) ** 2`` in float64 (ldm calls it "linear" although it
  is linear in sqrt(beta)). DDIM timesteps as ldm's ``make_ddim_timesteps("uniform")``.
* :func:`prediction_target` / :func:`eps_and_x0` - the one place that converts between what the UNet
  predicts (``"eps"``, the noise, as ldm and the original; or ``"v"``, see :data:`PREDICTIONS`) and the
  noise and clean latent that the sampler and the loss work with.
* :class:`KeypointLDM` - the :class:`kpnb.models.unet.UNet` plus the :class:`kpnb.poses.conditioning.PoseConditioner`
  (so EMA covers both), the schedule and the latent ``scale_factor``; :func:`make_ldm` builds one.
* :func:`ddim_step` (one update, DDIM paper eq. 12 and 16) and :func:`ddim_sample` (the loop: guidance,
  inpainting, an ``x0_fn`` such as codebook snapping, a per-step callback, a seed).
* :func:`train_ldm` / :func:`load_ldm` (through :func:`kpnb.train.loop.train`), :func:`sample_images`,
  :func:`pose_fidelity` (PCK of generated images, as ``docs/metrics.md`` defines it), :func:`validation_loss`.

Diffusion runs on the VQ model's *pre-quantisation* latents (``vq.encode``) times ``scale_factor``
(1 / std of the training latents, ldm's ``scale_by_std``; the original ran with ldm's default 1.0). A sample
is divided by it, quantised and decoded (:func:`decode_latents`). Settings come from a preset's
``diffusion`` section (:mod:`kpnb.run.folder`), the one place for their values.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kpnb.core import files
from kpnb.core import progress as kprogress
from kpnb.core.images import to_model, to_uint8
from kpnb.core.runtime import Runtime, current
from kpnb.diffusion.schedule import PREDICTIONS, Schedule, eps_and_x0, prediction_target
from kpnb.models.unet import UNet, UNetConfig
from kpnb.poses.conditioning import Cond, PoseConditioner, parse_modes


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


@dataclass(frozen=True)
class LDMArch:
    """The shape of a KeypointLDM's networks (:class:`kpnb.models.unet.UNetConfig` says more). The UNet:
    ``base`` channels times ``mults`` per level, ``num_res_blocks`` per level, attention at the downsampling
    factors ``attn_ds`` with ``heads`` heads (``self_attn=False``: cross-attention only; ``pos_freqs`` > 0:
    Fourier features of each position added), ``dropout``, and its target ``prediction``: "eps" (ldm, the
    original) or "v" (see :data:`PREDICTIONS`). The pose conditioning: tokens of ``token_dim``, skeleton
    Gaussians ``sigma`` latent pixels wide."""
    base: int = 64
    mults: Sequence[int] = (1, 2, 2)
    num_res_blocks: int = 2
    attn_ds: Sequence[int] = (2,)
    heads: int = 4
    token_dim: int = 64
    self_attn: bool = True
    dropout: float = 0.0
    sigma: float = 1.0
    pos_freqs: int = 0
    prediction: str = "eps"


def make_ldm(modes: str | Sequence[str], latent_shape: Sequence[int], arch: LDMArch | None = None, *,
             scale_factor: float = 1.0, schedule: Schedule | None = None, **fields: Any) -> KeypointLDM:
    """A KeypointLDM for conditioning ``modes`` on latents of ``latent_shape`` = (C, h, w), shaped by ``arch``
    (default :class:`LDMArch`) with any of its fields replaced by keyword (``base=32``): the UNet's input
    channels and context width follow from the modes. ``schedule``: default :class:`Schedule` (T = 1000)."""
    a = dataclasses.replace(arch or LDMArch(), **fields)
    C, h, w = latent_shape
    if h != w:
        raise ValueError(f"square latents expected, got {tuple(latent_shape)}")
    cond = PoseConditioner(parse_modes(modes), latent_size=h, token_dim=a.token_dim, sigma=a.sigma)
    cfg = UNetConfig(in_channels=C + cond.concat_channels, out_channels=C, base=a.base, mults=tuple(a.mults),
                     num_res_blocks=a.num_res_blocks, attn_ds=tuple(a.attn_ds), heads=a.heads,
                     context_dim=cond.context_dim, self_attn=a.self_attn, dropout=a.dropout, pos_freqs=a.pos_freqs)
    return KeypointLDM(cfg, cond, latent_shape, scale_factor, schedule or Schedule(), a.prediction)


#: The keys of a preset's ``diffusion`` section that shape the model (fields of :class:`LDMArch`).
ARCH_KEYS = ("base", "mults", "num_res_blocks", "attn_ds", "heads", "token_dim", "self_attn", "dropout", "sigma",
             "prediction")


def ldm_from_settings(cfg: Mapping[str, Any], modes: str | Sequence[str], latent_shape: Sequence[int], *,
                      scale_factor: float = 1.0) -> KeypointLDM:
    """:func:`make_ldm` with the model keys (:data:`ARCH_KEYS`) of a preset's ``diffusion`` section."""
    return make_ldm(modes, latent_shape, LDMArch(**{k: cfg[k] for k in ARCH_KEYS}), scale_factor=scale_factor)


def original_ldm() -> KeypointLDM:
    """The original project's model, ready for its released weights (:func:`unet_state_from_ldm` into
    ``.unet``; :func:`kpnb.original.ldm.load_original_ldm` reads the released file whole): grid conditioning
    (context [B, 1, 17]), 64x64x3 f4 latents, ldm's default scale_factor 1.0 (the original config sets no
    ``scale_by_std``), base 160, mults 1,2,3,4, attention at 1/2, 1/4, 1/8, 8 heads. Its learned null pose is
    new (the original had no guidance): train it, or sample at guidance 1."""
    arch = LDMArch(base=160, mults=(1, 2, 3, 4), num_res_blocks=2, attn_ds=(2, 4, 8), heads=8)
    m = make_ldm("grid", (3, 64, 64), arch, scale_factor=1.0)
    assert m.unet.cfg == UNetConfig.original()
    return m


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
    ``.npy`` at ``path``. Written once (through :func:`kpnb.core.files.atomic_path`, its space reserved first, so
    a full disk is a clear error; the JSON sidecar with
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
        with files.atomic_path(path, tmp, size=4 * math.prod(shape)) as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
            files.reserve(tmp, tmp.stat().st_size)  # a full disk: an error here, not a crash in the loop
            with torch.no_grad():
                for i in kprogress.bar(range(0, len(images), batch_size), desc=f"latents {path.stem}",
                                       disable=not progress, unit_label="batch"):
                    x = to_model(images[i:i + batch_size]).to(dev)
                    out[i:i + len(x), 0] = vq.encode(x).float().cpu().numpy()
                    out[i:i + len(x), 1] = vq.encode(x.flip(-1)).float().cpu().numpy()
            out.flush()
            del out
        files.write_json(side, want)
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


def model_stats(model: nn.Module, example: Sequence[torch.Tensor]) -> dict[str, float]:
    """Parameters (millions) and forward GFLOP per sample (torch's FLOP counter, one multiply-add = 2 FLOP)."""
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(*example)
    n = example[0].shape[0]
    return {"params_M": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflop_per_sample": fc.get_total_flops() / n / 1e9}
