"""Image range conversion, the one place for it: uint8 NHWC arrays (files, figures, metrics) <-> float NCHW
tensors in [-1, 1] (every model's input and output); and the check that images are uint8 NHWC."""
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


def check_uint8_images(images: Any, name: str = "images", *, single: bool = False) -> np.ndarray:
    """``images`` as a uint8 numpy array [N, H, W, 3] without a copy (a memory-mapped subset stays on disk:
    callers convert it batch by batch), or a ValueError naming ``name`` and the type, dtype and shape found.
    ``single``: one image [H, W, 3] is also taken, as a batch of one."""
    try:
        arr = np.asarray(images)
    except (TypeError, ValueError, RuntimeError) as e:  # e.g. a tensor on the GPU, a ragged list
        raise ValueError(f"{name}: expected uint8 images [N, H, W, 3], got a {type(images).__name__} that is "
                         f"not an array ({e})") from e
    batch = arr[None] if single and arr.ndim == 3 else arr
    if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
        want = "[N, H, W, 3] or [H, W, 3]" if single else "[N, H, W, 3]"
        raise ValueError(f"{name}: expected uint8 images {want}, got a {type(images).__name__} of {arr.dtype} "
                         f"{list(arr.shape)}")
    return batch
