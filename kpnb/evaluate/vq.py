"""VQ reconstructions measured: PSNR, codebook usage."""
from __future__ import annotations

import numpy as np
import torch

from kpnb.core.images import check_uint8_images, to_uint8
from kpnb.models.vq import VQModel, to_model_range

# ---- evaluation ---------------------------------------------------------------------------------------
PSNR_CAP = 100.0  # dB, for a perfect reconstruction (so means stay finite)


def reconstruction_metrics(originals: np.ndarray, recons: np.ndarray) -> dict[str, float]:
    """PSNR (dB, per image on [0, 1] then averaged; capped at PSNR_CAP) and MAE in [0, 1] units, for arrays
    of the same shape in [0, 1] (float) or uint8."""
    a, b = (np.asarray(v, dtype=np.float64) / (255.0 if np.asarray(v).dtype == np.uint8 else 1.0)
            for v in (originals, recons))
    if a.shape != b.shape:
        raise ValueError(f"reconstruction_metrics: shapes differ {a.shape} vs {b.shape}")
    err = (a - b).reshape(len(a), -1)
    mse = (err ** 2).mean(1)
    psnr = np.where(mse > 0, 10 * np.log10(1.0 / np.maximum(mse, 1e-300)), PSNR_CAP).clip(max=PSNR_CAP)
    return {"psnr": float(psnr.mean()), "mae": float(np.abs(err).mean())}


def code_usage(indices: np.ndarray | torch.Tensor, n_codes: int) -> dict[str, float]:
    """Perplexity (exp of the entropy of the code histogram) and the fraction of codes used at least once.
    With code groups, ``indices`` are rows of all G codebooks and ``n_codes`` is their total, G x n_codes."""
    counts = np.bincount(np.asarray(indices).ravel(), minlength=n_codes).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"codebook_perplexity": float(np.exp(-(nz * np.log(nz)).sum())),
            "codebook_used_fraction": float((counts > 0).mean())}


@torch.no_grad()
def reconstruct(model: VQModel, images: np.ndarray, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """(reconstructions uint8 [N, H, W, 3], code indices [N, h, w]) of uint8 images."""
    model.eval()
    data = check_uint8_images(images)
    dev = next(model.parameters()).device
    recs, idxs = [], []
    for i in range(0, len(data), batch_size):
        zq, idx, _ = model.quantize(model.encode(to_model_range(data[i:i + batch_size]).to(dev)))
        recs.append(to_uint8(model.decode(zq)))
        idxs.append(idx.cpu().numpy())
    return np.concatenate(recs), np.concatenate(idxs)


def evaluate_vq(model: VQModel, images: np.ndarray, batch_size: int = 64) -> dict[str, float]:
    """Held-out metrics: psnr, mae (of the uint8 reconstructions), codebook_perplexity,
    codebook_used_fraction."""
    recs, idx = reconstruct(model, images, batch_size)
    return {**reconstruction_metrics(images, recs), **code_usage(idx, model.quantizer.n_rows)}
