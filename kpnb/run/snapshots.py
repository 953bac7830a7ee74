"""The transformer's progress for one pose, as images: the image after a few of its codes are drawn (notebook
07's code-by-code row; the diffusion counterpart is :func:`kpnb.diffusion.sampling.ddim_snapshots`)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from kpnb.diffusion.sampling import snapshot_steps
from kpnb.models.transformer import CondTransformer, decode_codes, sample_codes


def code_snapshots(model: CondTransformer, vq: nn.Module, pose: Any, *, fill_code: int, n_snapshots: int = 8,
                   seed: int = 0, **settings: Any) -> np.ndarray:
    """The transformer's codes for one pose [1, 17, 3] (:func:`kpnb.models.transformer.sample_codes` with
    ``settings``: temperature, top_k, top_p) decoded after the steps ``snapshot_steps(h * w, n_snapshots)`` names
    (step i: i + 1 codes drawn, in raster order; the last is the sample), the codes not drawn yet set to
    ``fill_code`` (e.g. the most common one): uint8 [n_snapshots, H, W, 3]."""
    h, w = model.cfg.latent_size
    at = snapshot_steps(h * w, n_snapshots)
    kept: dict[int, torch.Tensor] = {}

    def keep(d: dict[str, Any]) -> None:
        if d["i"] in at:
            grid = torch.full((1, h * w), fill_code, dtype=torch.long)
            grid[0, : d["codes"].shape[1]] = d["codes"][0].cpu()
            kept[d["i"]] = grid.view(1, h, w)

    sample_codes(model, pose, seed=seed, callback=keep, **settings)
    return decode_codes(vq, torch.cat([kept[i] for i in at]))
