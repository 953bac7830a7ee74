"""The heatmap keypoint network (the PCK judge and the tuning's pose keeper) and its prediction."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kpnb.core.images import to_model
from kpnb.poses.pose import HIDDEN, N_JOINTS, OUTSIDE, VISIBLE

# visibility classes of the estimator's head -> kpnb visibility codes
VIS_CLASSES = (OUTSIDE, HIDDEN, VISIBLE)
CODE_TO_CLASS = {OUTSIDE: 0, HIDDEN: 1, VISIBLE: 2}


# ======================================================================================================
# The network
# ======================================================================================================
def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Res(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_cbr(ch, ch), nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class PoseNet(nn.Module):
    """images [B, 3, S, S] in [-1, 1] -> (heatmap logits [B, 17, S/4, S/4], visibility logits [B, 17, 3]).
    ``width``: channels at 1/2 resolution (doubling-ish deeper)."""
    def __init__(self, image_size: int = 64, width: int = 16):
        super().__init__()
        self.image_size, self.width = image_size, width
        w = width
        c2, c4, c8, c16 = w, 2 * w, 3 * w, 4 * w
        self.stem = nn.Sequential(_cbr(3, c2, 2), _cbr(c2, c2))                 # 1/2
        self.down4 = nn.Sequential(_cbr(c2, c4, 2), _Res(c4))                    # 1/4
        self.down8 = nn.Sequential(_cbr(c4, c8, 2), _Res(c8))                    # 1/8
        self.down16 = nn.Sequential(_cbr(c8, c16, 2), _Res(c16), _Res(c16))      # 1/16: whole-image context
        self.lat8 = nn.Conv2d(c8, c16, 1)
        self.up8 = _cbr(c16, c8)
        self.lat4 = nn.Conv2d(c4, c8, 1)
        self.up4 = nn.Sequential(_cbr(c8, c8), _cbr(c8, c8))
        self.heatmap = nn.Conv2d(c8, N_JOINTS, 1)
        self.vis = nn.Linear(c16 + c8, N_JOINTS * len(VIS_CLASSES))

    def config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "width": self.width}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f4 = self.down4(self.stem(x))
        f8 = self.down8(f4)
        f16 = self.down16(f8)
        u8 = self.up8(F.interpolate(f16, scale_factor=2.0, mode="nearest") + self.lat8(f8))
        u4 = self.up4(F.interpolate(u8, scale_factor=2.0, mode="nearest") + self.lat4(f4))
        pooled = torch.cat([f16.mean((2, 3)), u4.mean((2, 3))], 1)
        return self.heatmap(u4), self.vis(pooled).view(-1, N_JOINTS, len(VIS_CLASSES))


def _heatmap_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each heatmap's softmax [B, J, h, w] and the pixel centres (i + 0.5) / w along x and y."""
    B, J, h, w = logits.shape
    p = logits.flatten(2).softmax(-1).view(B, J, h, w)
    xs = (torch.arange(w, device=logits.device, dtype=logits.dtype) + 0.5) / w
    ys = (torch.arange(h, device=logits.device, dtype=logits.dtype) + 0.5) / h
    return p, xs, ys


def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Heatmap logits [B, J, h, w] -> expected (x, y) [B, J, 2] in normalised image coordinates (pixel
    centres at (i + 0.5) / w)."""
    p, xs, ys = _heatmap_probs(logits)
    return torch.stack([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], -1)


def _to_input(images: Any, size: int, device: torch.device) -> torch.Tensor:
    """uint8 [N, H, W, 3] (or float [N, 3, H, W] in [-1, 1]) -> float [N, 3, size, size] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got {list(x.shape)}")
        x = to_model(x)
    x = x.to(device)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def predict(model: PoseNet, images: Any, batch_size: int = 256, with_scores: bool = False) -> Any:
    """Estimate poses of uint8 images [N, H, W, 3]: float32 [N, 17, 3] = (x, y, visibility code), codes
    from the visibility head (OUTSIDE, HIDDEN or VISIBLE); x, y always the heatmap position.

    ``with_scores=True`` returns (poses, scores [N]): a detection confidence for keypoint AP, the mean over
    joints of (the heatmap's softmax mass within 1.5 heatmap cells of the read-out position) x (the
    visibility head's probability that the joint is in the frame). A sharp, single-peaked map of a joint
    the head places in the frame scores near 1; a diffuse or doubled map, or a joint it thinks is outside,
    scores low."""
    model.eval()
    dev = next(model.parameters()).device
    out, scores = [], []
    n = len(images)
    for i in range(0, n, batch_size):
        hm, vl = model(_to_input(images[i:i + batch_size], model.image_size, dev))
        xy = soft_argmax(hm)
        code = torch.tensor(VIS_CLASSES, device=dev)[vl.argmax(-1)].float()
        out.append(torch.cat([xy, code[..., None]], -1).cpu())
        if with_scores:
            scores.append(_confidence(hm.float(), xy.float(), vl.float()).cpu())
    poses = torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, N_JOINTS, 3), np.float32)
    if not with_scores:
        return poses
    return poses, (torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0))


def _confidence(logits: torch.Tensor, xy: torch.Tensor, vis_logits: torch.Tensor) -> torch.Tensor:
    h, w = logits.shape[-2:]
    p, xs, ys = _heatmap_probs(logits)
    d2 = ((xs.view(1, 1, 1, w) - xy[..., 0, None, None]) * w) ** 2 + ((ys.view(1, 1, h, 1) - xy[..., 1, None, None]) * h) ** 2
    mass = (p * (d2 <= 1.5 ** 2)).sum((2, 3))                                  # [B, J]
    in_frame = 1 - vis_logits.softmax(-1)[..., VIS_CLASSES.index(OUTSIDE)]    # [B, J]
    return (mass * in_frame).mean(1)
