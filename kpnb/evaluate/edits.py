"""What an image edit changed: a *semantic* change (an attribute the classifier sees, a region recoloured as a
whole) against a *pixel-wise* one (colour noise laid over the image).

The original write-up judged CLIP tuning towards "colorful" by eye: semantic on f16 latents (hair strands in
other colours), struggling on f8, "pure pixel-wise" on f4. These numbers separate the two on uint8 images
``[N, H, W, 3]`` before and after the edit:

* :func:`high_freq_share` - the share of the change's energy above a spatial frequency: noise laid over the
  pixels is mostly high-frequency; a part recoloured as a whole is mostly low-frequency;
* :func:`attribute_changes` - how often the attribute classifier's call (e.g. the hair colour) changed, and how
  many different calls the edited images get: a semantic edit changes what the image shows;
* :func:`saturation` - a pixel statistic of "colourful" that no model judges.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kpnb.models.attributes import attribute_probs


def saturation(images: np.ndarray) -> np.ndarray:
    """Mean HSV saturation per image (uint8 ``[N, H, W, 3]``), in 0..1."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1e-6), 0.0).reshape(len(x), -1).mean(1)


def high_freq_share(before: np.ndarray, after: np.ndarray, cutoff: float = 0.25) -> np.ndarray:
    """Per image, the share of the energy of ``after - before`` (both uint8 ``[N, H, W, 3]``) at spatial
    frequencies above ``cutoff`` cycles per pixel (the Nyquist limit is 0.5), from the 2-D FFT of each channel.
    White noise puts ``1 - pi * cutoff**2`` of its energy there (0.80 at the default); a smooth recolouring
    of a region, far less. NaN where the images are equal."""
    if np.shape(after) != np.shape(before) or np.ndim(before) != 4:
        raise ValueError(f"high_freq_share: two image stacks of one shape [N, H, W, 3], got {np.shape(before)} "
                         f"and {np.shape(after)}")
    d = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    power = np.abs(np.fft.fft2(d, axes=(1, 2))) ** 2
    fy, fx = np.fft.fftfreq(d.shape[1]), np.fft.fftfreq(d.shape[2])
    high = np.hypot(fy[:, None], fx[None, :]) > cutoff
    total = power.sum(axis=(1, 2, 3))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, power[:, high].sum(axis=(1, 2)) / total, np.nan)


def attribute_changes(attr_model: torch.nn.Module, before: np.ndarray, after: np.ndarray,
                      attribute: str = "hair_colour") -> dict[str, Any]:
    """The attribute classifier's calls on ``before`` and ``after``: ``changed`` (the share of images whose
    call for ``attribute`` changed), ``distinct_before`` / ``distinct_after`` (how many different calls the
    images get) and ``entropy_before`` / ``entropy_after`` (of the calls' distribution over the images, in
    bits)."""
    if attribute not in attr_model.classes:
        raise ValueError(f"attribute {attribute!r} is not one the classifier knows: {list(attr_model.classes)}")
    calls = [attribute_probs(attr_model, x)[attribute].argmax(-1) for x in (before, after)]
    out: dict[str, Any] = {"changed": float((calls[0] != calls[1]).mean())}
    for name, c in zip(("before", "after"), calls):
        share = np.bincount(c, minlength=len(attr_model.classes[attribute])) / len(c)
        nz = share[share > 0]
        out[f"distinct_{name}"] = int(len(nz))
        out[f"entropy_{name}"] = float(-(nz * np.log2(nz)).sum())
    return out


def describe_edit(before: np.ndarray, after: np.ndarray, attr_model: torch.nn.Module | None = None,
                  attribute: str = "hair_colour") -> dict[str, Any]:
    """The numbers of this module for one edit, as flat keys: ``high_freq_share`` (the median over images),
    ``saturation_before`` / ``_after`` and, given ``attr_model``, :func:`attribute_changes` prefixed with
    ``<attribute>.``."""
    out: dict[str, Any] = {"high_freq_share": float(np.nanmedian(high_freq_share(before, after))),
                           "saturation_before": float(saturation(before).mean()),
                           "saturation_after": float(saturation(after).mean())}
    if attr_model is not None:
        out.update({f"{attribute}.{k}": v for k, v in attribute_changes(attr_model, before, after, attribute).items()})
    return out

