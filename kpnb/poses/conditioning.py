"""Keypoint encoders: how a pose reaches the diffusion UNet.

A pose enters as a float tensor ``[B, 17, 3]`` = (x, y, visibility code) per joint, i.e. stacked
:meth:`kpnb.poses.pose.Pose.to_array` (x right, y down, normalised 0..1; codes MISSING=0, HIDDEN=1,
VISIBLE=2, OUTSIDE=3). :class:`PoseConditioner` turns it into up to two things the UNet consumes:

* ``context`` ``[B, N, D]``: a token sequence for cross-attention (modes ``grid`` or ``tokens``),
* ``concat`` ``[B, C, h, w]``: maps at latent resolution, concatenated to the UNet input (mode ``skeleton``).

The three modes, usable together as a set (``{"tokens", "skeleton"}``), except that ``grid`` and ``tokens``
both make the cross-attention context and so exclude each other:

``grid`` (faithful to the original project)
    :func:`kpnb.poses.pose.grid_tokens` with ``faithful_axes=True`` - 17 integers ``y_cell + 32 * x_cell``
    (the original's transposed axis order: the image row is the fast index) - fed *unnormalised*, as one
    float vector: context ``[B, 1, 17]``, context_dim 17. Raw values (0..1023) are what the released
    checkpoint was trained on. With a single context token, cross-attention's softmax is over one key, so
    this mode is in effect a learned per-sample bias computed from the 17 numbers.
``tokens``
    17 tokens, one per joint: learned joint embedding + learned visibility embedding + an MLP of Fourier
    features of (x, y), then LayerNorm -> ``[B, 17, D]``. MISSING joints get no coordinate term (their token
    is joint + "missing" embedding: a learned null per joint). OUTSIDE joints *keep* their coordinates
    (clamped to [-1, 2]) plus the "outside" embedding: where an off-frame wrist is tells where the arm
    leaves the frame.
``skeleton``
    ``17 + 16`` channels at latent resolution: one Gaussian heatmap per joint (amplitude 1 visible, 0.5
    hidden, 0 outside/missing) and one per limb of :data:`kpnb.poses.pose.LIMBS` (a Gaussian tube around
    the segment, drawn when neither end is MISSING - a limb to an OUTSIDE joint is drawn up to the frame
    edge; 0.5 when either end is hidden). Pixel centres sit at ``(i + 0.5) / size``, so mirroring a map
    is exactly the map of the mirrored pose (with channels permuted, see :func:`flip_maps`) - except for a
    joint exactly on x = 0 or x = 1, which the half-open frame [0, 1) re-marks OUTSIDE/VISIBLE in a flip.

Classifier-free guidance: every mode owns a learned *null* (``grid``: a 17-vector; ``tokens``: 17 null
tokens; ``skeleton``: a learned per-channel constant map). ``forward(poses, drop)`` replaces, for samples
where ``drop`` is True, every mode's output by its null - conditioning dropout during training (p ~ 0.1,
per sample, all modes together) and the unconditional branch at sampling time.

Bad poses (wrong shape, NaN/inf, visibility codes not in 0..3) raise :class:`kpnb.poses.pose.PoseError`
from :func:`check_poses`, naming the sample and the joint.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from kpnb.poses.pose import (
    FLIP_PERM,
    HIDDEN,
    JOINTS,
    LIMBS,
    MISSING,
    N_JOINTS,
    OUTSIDE,
    VISIBLE,
    Pose,
    PoseError,
    grid_tokens,
)

MODES = ("grid", "tokens", "skeleton")
N_LIMBS = len(LIMBS)
SKELETON_CHANNELS = N_JOINTS + N_LIMBS


def _limb_flip_perm() -> list[int]:
    """Channel permutation of the limb maps under a mirror: limb (a, b) becomes (FLIP_PERM[a], FLIP_PERM[b])."""
    index = {frozenset(l): i for i, l in enumerate(LIMBS)}
    return [index[frozenset((FLIP_PERM[a], FLIP_PERM[b]))] for a, b in LIMBS]


LIMB_FLIP_PERM = _limb_flip_perm()
SKELETON_FLIP_PERM = list(FLIP_PERM) + [N_JOINTS + i for i in LIMB_FLIP_PERM]


# ---- pose input -----------------------------------------------------------------------------------------
def check_poses(poses: Any, *, name: str = "poses") -> torch.Tensor:
    """Validate and convert poses to a float32 tensor ``[B, 17, 3]``.

    Accepts a :class:`Pose`, a list of Poses, or an array/tensor ``[17, 3]`` / ``[B, 17, 3]``. Raises
    :class:`PoseError` naming the sample and joint for a wrong shape, non-finite coordinates or a
    visibility code that is not one of 0..3 (integers)."""
    if isinstance(poses, Pose):
        poses = [poses]
    if isinstance(poses, (list, tuple)) and poses and all(isinstance(p, Pose) for p in poses):
        poses = np.stack([p.to_array() for p in poses])
    try:
        t = torch.as_tensor(np.asarray(poses) if not torch.is_tensor(poses) else poses).detach().cpu()
    except (TypeError, ValueError) as e:
        raise PoseError(f"cannot read poses as an array ({e})", field=name) from e
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3 or t.shape[1:] != (N_JOINTS, 3):
        raise PoseError(f"expected shape [B, 17, 3] (x, y, visibility code per joint), got {list(t.shape)}",
                        field=name)
    if not (t.is_floating_point() or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise PoseError(f"expected numbers, got dtype {t.dtype}", field=name)
    t = t.float()
    bad = ~torch.isfinite(t[..., :2]).all(-1)
    if bad.any():
        b, j = (int(v) for v in bad.nonzero()[0])
        raise PoseError(f"coordinates of sample {b}, joint {JOINTS[j]!r} are not finite "
                        f"({t[b, j, :2].tolist()})", field=f"{name}[{b}].{JOINTS[j]}")
    vis = t[..., 2]
    bad = ~(torch.isfinite(vis) & (vis == vis.round()) & (vis >= 0) & (vis <= 3))
    if bad.any():
        b, j = (int(v) for v in bad.nonzero()[0])
        raise PoseError(f"visibility code of sample {b}, joint {JOINTS[j]!r} is {float(vis[b, j])}; expected "
                        f"0 (missing), 1 (hidden), 2 (visible) or 3 (outside)", field=f"{name}[{b}].{JOINTS[j]}")
    return t


def parse_modes(modes: str | Iterable[str]) -> tuple[str, ...]:
    """``"tokens+skeleton"``, ``"tokens,skeleton"`` or an iterable -> sorted tuple in :data:`MODES` order."""
    if isinstance(modes, str):
        modes = [m for m in modes.replace("+", ",").split(",") if m.strip()]
    got = {m.strip() for m in modes}
    unknown = got - set(MODES)
    if unknown or not got:
        raise ValueError(f"conditioning modes {sorted(got)}: valid modes are {', '.join(MODES)} (one or more)")
    if {"grid", "tokens"} <= got:
        raise ValueError("conditioning modes 'grid' and 'tokens' both make the cross-attention context; pick one")
    return tuple(m for m in MODES if m in got)


# ---- flip -------------------------------------------------------------------------------------------------
def flip_poses(poses: torch.Tensor) -> torch.Tensor:
    """Mirror pose tensors ``[..., 17, 3]``: x -> 1 - x for labelled joints, left/right swapped, and OUTSIDE
    re-judged against the frame exactly as :func:`kpnb.poses.pose.flip` does (a joint at x = 0 lands on
    x = 1, which is outside; one at x = 1 comes back to 0, inside)."""
    out = poses.clone()
    vis = out[..., 2]
    lab = vis != MISSING
    out[..., 0] = torch.where(lab, 1.0 - out[..., 0], out[..., 0])
    out = out[..., FLIP_PERM, :]
    lab = out[..., 2] != MISSING
    xy = out[..., :2]
    outside = ((xy < 0) | (xy >= 1)).any(-1)
    vis = out[..., 2]
    vis = torch.where(lab & outside, torch.full_like(vis, OUTSIDE), vis)
    vis = torch.where((vis == OUTSIDE) & ~outside, torch.full_like(vis, VISIBLE), vis)
    out[..., 2] = vis
    return out


def flip_maps(maps: torch.Tensor) -> torch.Tensor:
    """Mirror skeleton maps ``[B, 33, h, w]``: width reversed and joint/limb channels swapped."""
    return maps.flip(-1)[:, SKELETON_FLIP_PERM]


def flip_batch(images: torch.Tensor, poses: torch.Tensor, which: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip images or latents ``[B, C, H, W]`` and their poses ``[B, 17, 3]`` together (all samples, or
    those where the bool tensor ``which`` is True) - the augmentation used by every trainer."""
    if which is None:
        return images.flip(-1), flip_poses(poses)
    w = which.to(torch.bool)
    return (torch.where(w[:, None, None, None], images.flip(-1), images),
            torch.where(w[:, None, None], flip_poses(poses), poses))


def mask_joints(poses: torch.Tensor, u: torch.Tensor, p: float) -> torch.Tensor:
    """Pose tensors ``[B, 17, 3]`` as a person's annotation may give them: each joint MISSING (coordinates
    zeroed) where ``u[..., 0] < p``, and each other VISIBLE joint HIDDEN where ``u[..., 1] < p``; ``u``
    ``[B, 17, 2]`` uniform draws. The training augmentation ``joint_drop``: the synthetic data labels every
    joint, real annotations leave a quarter of them unlabelled and mark some hidden, and codes a model never
    saw in training (the untrained "missing" and "hidden" embeddings) steer its samples nowhere in particular."""
    vis = poses[..., 2]
    miss = u[..., 0] < p
    hide = (u[..., 1] < p) & (vis == VISIBLE) & ~miss
    vis = torch.where(miss, float(MISSING), torch.where(hide, float(HIDDEN), vis))
    xy = poses[..., :2] * (~miss)[..., None]
    return torch.cat([xy, vis[..., None]], -1)


# ---- encoders -------------------------------------------------------------------------------------------
def grid_context(poses: torch.Tensor) -> torch.Tensor:
    """The original's context: ``keypoints.grid_tokens(pose, faithful_axes=True)`` as floats, ``[B, 1, 17]``."""
    toks = [grid_tokens(Pose.from_array(p)) for p in poses.detach().cpu().numpy()]
    return torch.as_tensor(np.stack(toks), dtype=torch.float32, device=poses.device)[:, None, :]


def fourier_features(xy: torch.Tensor, n_freq: int) -> torch.Tensor:
    """``[..., 2]`` -> ``[..., 4 * n_freq]``: sin and cos of ``pi * 2^k * coord`` for k < n_freq."""
    freqs = math.pi * 2.0 ** torch.arange(n_freq, device=xy.device, dtype=xy.dtype)
    a = (xy[..., None] * freqs).flatten(-2)  # [..., 2 * n_freq]
    return torch.cat([a.sin(), a.cos()], -1)


def skeleton_maps(poses: torch.Tensor, size: int, sigma: float = 1.0) -> torch.Tensor:
    """Joint heatmaps and limb tubes at ``size`` x ``size``: ``[B, 17 + 16, size, size]`` in 0..1.
    ``sigma`` is in map pixels. See the module docstring for the amplitudes."""
    B, dev = poses.shape[0], poses.device
    xy, vis = poses[..., :2] * size, poses[..., 2]   # map pixel units
    c = torch.arange(size, device=dev, dtype=torch.float32) + 0.5
    gy, gx = torch.meshgrid(c, c, indexing="ij")
    grid = torch.stack([gx, gy], -1)                 # [S, S, 2] (x, y) pixel centres
    amp = torch.where(vis == VISIBLE, 1.0, torch.where(vis == HIDDEN, 0.5, 0.0))  # [B, 17]
    d2 = ((grid[None, None] - xy[:, :, None, None]) ** 2).sum(-1)             # [B, 17, S, S]
    joints = amp[..., None, None] * torch.exp(-d2 / (2 * sigma ** 2))

    a_idx = torch.tensor([a for a, _ in LIMBS], device=dev)
    b_idx = torch.tensor([b for _, b in LIMBS], device=dev)
    pa, pb = xy[:, a_idx], xy[:, b_idx]                                         # [B, L, 2]
    seg = pb - pa
    rel = grid[None, None] - pa[:, :, None, None]                               # [B, L, S, S, 2]
    t = (rel * seg[:, :, None, None]).sum(-1) / (seg ** 2).sum(-1).clamp_min(1e-8)[..., None, None]
    d2 = ((rel - t.clamp(0, 1)[..., None] * seg[:, :, None, None]) ** 2).sum(-1)
    va, vb = vis[:, a_idx], vis[:, b_idx]
    lamp = torch.where((va == MISSING) | (vb == MISSING), 0.0,
                       torch.where((va == HIDDEN) | (vb == HIDDEN), 0.5, 1.0))
    limbs = lamp[..., None, None] * torch.exp(-d2 / (2 * sigma ** 2))
    return torch.cat([joints, limbs], 1).reshape(B, SKELETON_CHANNELS, size, size)


@dataclass
class Cond:
    """What the UNet gets: cross-attention ``context`` [B, N, D] and input ``concat`` maps [B, C, h, w]."""

    context: torch.Tensor | None = None
    concat: torch.Tensor | None = None

    def cat(self, other: "Cond") -> "Cond":
        """Stack two conditionings along the batch (conditional and unconditional in one UNet call)."""
        join = lambda a, b: None if a is None else torch.cat([a, b])  # noqa: E731
        return Cond(join(self.context, other.context), join(self.concat, other.concat))


class PoseConditioner(nn.Module):
    """Poses ``[B, 17, 3]`` -> :class:`Cond` for the chosen ``modes`` (see the module docstring).

    ``latent_size``: side of the latent the skeleton maps must match; ``token_dim``: D of ``tokens``;
    ``n_freq``: Fourier frequencies per coordinate; ``sigma``: skeleton Gaussian width in latent pixels.
    """

    def __init__(self, modes: str | Iterable[str], latent_size: int, token_dim: int = 64, n_freq: int = 6,
                 sigma: float = 1.0):
        super().__init__()
        self.modes = parse_modes(modes)
        self.latent_size, self.token_dim, self.n_freq, self.sigma = latent_size, token_dim, n_freq, sigma
        if "grid" in self.modes:
            # Learned null for the faithful mode: the original had none (no guidance); init in token range.
            self.null_grid = nn.Parameter(torch.full((1, 1, N_JOINTS), -1.0))
        if "tokens" in self.modes:
            D = token_dim
            self.joint_emb = nn.Embedding(N_JOINTS, D)
            self.vis_emb = nn.Embedding(4, D)  # indexed by the visibility code; MISSING's row is the null joint
            self.coord_mlp = nn.Sequential(nn.Linear(4 * n_freq + 2, D), nn.SiLU(), nn.Linear(D, D))
            self.norm = nn.LayerNorm(D)
            self.null_tokens = nn.Parameter(torch.randn(1, N_JOINTS, D) * 0.02)
            nn.init.normal_(self.joint_emb.weight, std=0.5)
            nn.init.normal_(self.vis_emb.weight, std=0.5)
        if "skeleton" in self.modes:
            self.null_map = nn.Parameter(torch.zeros(1, SKELETON_CHANNELS, 1, 1))

    @property
    def context_dim(self) -> int | None:
        return N_JOINTS if "grid" in self.modes else self.token_dim if "tokens" in self.modes else None

    @property
    def concat_channels(self) -> int:
        return SKELETON_CHANNELS if "skeleton" in self.modes else 0

    def config(self) -> dict[str, Any]:
        return {"modes": list(self.modes), "latent_size": self.latent_size, "token_dim": self.token_dim,
                "n_freq": self.n_freq, "sigma": self.sigma}

    def encode_tokens(self, poses: torch.Tensor) -> torch.Tensor:
        xy, vis = poses[..., :2], poses[..., 2].long()
        xy = xy.clamp(-1.0, 2.0)  # OUTSIDE joints keep their (bounded) coordinates
        coords = self.coord_mlp(torch.cat([xy, fourier_features(xy, self.n_freq)], -1))
        coords = coords * (vis != MISSING)[..., None]
        tok = self.joint_emb.weight[None] + self.vis_emb(vis) + coords
        return self.norm(tok)

    def forward(self, poses: torch.Tensor, drop: torch.Tensor | None = None) -> Cond:
        """Encode ``poses`` [B, 17, 3]; samples where ``drop`` [B] is True get every mode's learned null."""
        B = poses.shape[0]
        poses = poses.to(self.device_())
        context = concat = None
        d = None if drop is None else drop.to(poses.device, torch.bool)
        if "grid" in self.modes:
            context = grid_context(poses)
            if d is not None:
                context = torch.where(d[:, None, None], self.null_grid.expand(B, -1, -1), context)
        if "tokens" in self.modes:
            context = self.encode_tokens(poses)
            if d is not None:
                context = torch.where(d[:, None, None], self.null_tokens.expand(B, -1, -1), context)
        if "skeleton" in self.modes:
            concat = skeleton_maps(poses, self.latent_size, self.sigma)
            if d is not None:
                concat = torch.where(d[:, None, None, None], self.null_map.expand_as(concat), concat)
        return Cond(context, concat)

    def null(self, batch: int) -> Cond:
        """The unconditional conditioning (every sample dropped)."""
        dummy = torch.zeros(batch, N_JOINTS, 3, device=self.device_())
        return self.forward(dummy, torch.ones(batch, dtype=torch.bool))

    def device_(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")
