"""Image range conversion, the one place for it: uint8 NHWC arrays (files, figures, metrics) <-> float NCHW
tensors in [-1, 1] (every model's input and output)."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def to_model(images: Any) -> torch.Tensor:
    """uint8 images [N, H, W, 3] (numpy or tensor) -> float tensor [N, 3, H, W] in [-1, 1]."""
    if not torch.is_tensor(images):
        arr = np.ascontiguousarray(images)
        # a read-only memory map (a big subset): copy the rows asked for, torch wants writable memory
        images = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return images.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float tensor [N, 3, H, W] in [-1, 1] (clamped) -> uint8 numpy [N, H, W, 3]."""
    return x.detach().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
