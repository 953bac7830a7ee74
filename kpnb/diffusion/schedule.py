"""The noise schedule and one DDIM step, tied to the equations (eps or v prediction, converted in one place)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch


# ======================================================================================================
# The noise schedule
# ======================================================================================================
class Schedule:
    """DDPM schedule of ``T`` steps with ldm's "linear" betas (linear in sqrt(beta), float64).

    ``add_noise(x0, noise, t)`` is q(x_t | x_0); ``ddim_timesteps(steps)`` the DDIM sub-sequence, ``ddim_levels``
    the same with the noise levels a DDIM step needs."""

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

    def ddim_levels(self, steps: int) -> list[tuple[int, float, float]]:
        """The DDIM steps as ``(t, a_t, a_prev)``: each of :meth:`ddim_timesteps` with its alphas_cumprod and
        that of the next timestep. The last step goes to ldm's last level alphas_cumprod[0], not to alpha = 1
        (diffusers' ``set_alpha_to_one=False``)."""
        ts = self.ddim_timesteps(steps)
        a = self.alphas_cumprod
        return [(t, float(a[t]), float(a[nxt])) for t, nxt in zip(ts, ts[1:] + [0])]


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
