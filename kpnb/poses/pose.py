"""The one pose type of kpnb, its readers and writers, flip, tokenisers, drawing and plausibility features.

Inside kpnb a pose is a :class:`Pose`: 17 joints in COCO order, each with (x, y) in normalised image
coordinates (0..1, origin top-left, x to the right) and a visibility code:

* ``VISIBLE`` (2): labelled and visible
* ``HIDDEN`` (1): labelled but occluded
* ``MISSING`` (0): not labelled (coordinates are meaningless, stored as 0)
* ``OUTSIDE`` (3): labelled, but outside the image frame (coordinates kept, outside 0..1)

Every loader converts into it, every writer out of it. Two external formats are supported:

* the Danbooru pose-keypoint release: one JSON object per image, ``{"nose": [y, x], ...}`` in pixels of a
  512x512 frame. Note the **[row, col] = [y, x]** order. Values outside [0, 512) are kept and marked OUTSIDE.
* COCO person keypoints: ``[x1, y1, v1, ...]`` in image pixels with v in {0, 1, 2}.

Bad input raises :class:`PoseError`, which names the file (when known) and the field.
"""
from __future__ import annotations

import colorsys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw

JOINTS = [
    "nose", "eye_left", "eye_right", "ear_left", "ear_right",
    "shoulder_left", "shoulder_right", "elbow_left", "elbow_right",
    "wrist_left", "wrist_right", "hip_left", "hip_right",
    "knee_left", "knee_right", "ankle_left", "ankle_right",
]
N_JOINTS = len(JOINTS)
JOINT_INDEX = {name: i for i, name in enumerate(JOINTS)}
# Flip partner of each joint: "left" is the character's own left, so a mirror swaps every pair.
FLIP_PERM = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
LIMBS = [
    (4, 2), (2, 0), (0, 1), (1, 3),            # head
    (10, 8), (8, 6), (6, 5), (5, 7), (7, 9),   # arms and shoulders
    (16, 14), (14, 12), (12, 11), (11, 13), (13, 15),  # legs and hips
    (5, 11), (6, 12),                          # torso sides
]
JOINT_GROUPS = {
    "head": [0, 1, 2, 3, 4],
    "arms": [5, 6, 7, 8, 9, 10],
    "legs": [11, 12, 13, 14, 15, 16],
}

MISSING, HIDDEN, VISIBLE, OUTSIDE = 0, 1, 2, 3
VIS_NAMES = {MISSING: "missing", HIDDEN: "hidden", VISIBLE: "visible", OUTSIDE: "outside"}

RELEASE_FRAME = 512  # the release's coordinates are pixels of a 512x512 frame
GRID = 32            # the original tokeniser's grid (512 / 16)
MAX_COORD = 1e6      # pixel values beyond this are corrupt, not "outside the frame"


def _limb_side(a: int, b: int) -> str:
    names = JOINTS[a] + JOINTS[b]
    if "left" in names and "right" in names:
        return "centre"
    if "left" in names:
        return "left"
    if "right" in names:
        return "right"
    return "centre"


def _limb_colours() -> list[tuple[int, int, int]]:
    """A distinct colour per limb: warm hues for the character's left, cool for the right, greys/greens centre."""

    left = [i for i, l in enumerate(LIMBS) if _limb_side(*l) == "left"]
    right = [i for i, l in enumerate(LIMBS) if _limb_side(*l) == "right"]
    centre = [i for i, l in enumerate(LIMBS) if _limb_side(*l) == "centre"]
    out: list[tuple[int, int, int]] = [(0, 0, 0)] * len(LIMBS)
    for idx, hue0, hue1 in ((left, 0.0, 0.17), (right, 0.5, 0.75), (centre, 0.28, 0.42)):
        for k, i in enumerate(idx):
            h = hue0 + (hue1 - hue0) * k / max(1, len(idx) - 1)
            r, g, b = colorsys.hsv_to_rgb(h, 0.9, 1.0)
            out[i] = (int(r * 255), int(g * 255), int(b * 255))
    return out


LIMB_COLOURS = _limb_colours()


class PoseError(ValueError):
    """A pose could not be read: names the file (if known) and the offending field."""

    def __init__(self, message: str, *, source: str | Path | None = None, field: str | None = None):
        self.source = str(source) if source is not None else None
        self.field = field
        where = []
        if self.source:
            where.append(str(self.source))
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


@dataclass
class Pose:
    """17 joints: ``xy`` float32 [17, 2] normalised (x right, y down), ``vis`` int8 [17] visibility codes."""

    xy: np.ndarray
    vis: np.ndarray

    def __post_init__(self) -> None:
        self.xy = np.asarray(self.xy, dtype=np.float32).reshape(N_JOINTS, 2)
        self.vis = np.asarray(self.vis, dtype=np.int8).reshape(N_JOINTS)
        if not np.all(np.isfinite(self.xy)):
            raise PoseError("coordinates must be finite", field="xy")
        if not np.all(np.isin(self.vis, (MISSING, HIDDEN, VISIBLE, OUTSIDE))):
            raise PoseError("visibility codes must be 0..3", field="vis")

    # ---- basic views -------------------------------------------------------------------------------
    @property
    def labelled(self) -> np.ndarray:
        """Joints with a position (visible, hidden or outside the frame)."""
        return self.vis != MISSING

    @property
    def in_frame(self) -> np.ndarray:
        """Joints labelled, inside the frame (visible or hidden)."""
        return (self.vis == VISIBLE) | (self.vis == HIDDEN)

    def copy(self) -> "Pose":
        return Pose(self.xy.copy(), self.vis.copy())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pose) and np.array_equal(self.vis, other.vis) and np.allclose(
            self.xy, other.xy, atol=1e-5)

    def to_array(self) -> np.ndarray:
        """[17, 3] float32: x, y, visibility code."""
        return np.concatenate([self.xy, self.vis[:, None].astype(np.float32)], axis=1)

    @classmethod
    def from_array(cls, arr: Any) -> "Pose":
        arr = np.asarray(arr, dtype=np.float32)
        if arr.shape != (N_JOINTS, 3):
            raise PoseError(f"expected shape (17, 3), got {arr.shape}", field="array")
        return cls(arr[:, :2], arr[:, 2].round().astype(np.int8))

    @classmethod
    def from_pixels(cls, xy_px: Any, size: float, vis: Any | None = None) -> "Pose":
        """From [17, 2] pixel (x, y) in a square frame of ``size``; visibility derived from the frame."""
        xy = np.asarray(xy_px, dtype=np.float32) / float(size)
        if vis is None:
            vis = np.full(N_JOINTS, VISIBLE, dtype=np.int8)
        vis = np.asarray(vis, dtype=np.int8).copy()
        outside = ((xy < 0) | (xy >= 1)).any(axis=1) & (vis != MISSING)
        vis[outside] = OUTSIDE
        return cls(xy, vis)

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) over in-frame joints (all labelled joints if none are in frame)."""
        m = self.in_frame if self.in_frame.any() else self.labelled
        if not m.any():
            return (0.0, 0.0, 1.0, 1.0)
        p = self.xy[m]
        return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())

    def refresh_outside(self) -> "Pose":
        """Re-mark which labelled joints fall outside the 0..1 frame (after a geometric change)."""
        vis = self.vis.copy()
        out = ((self.xy < 0) | (self.xy >= 1)).any(axis=1)
        vis[(vis != MISSING) & out] = OUTSIDE
        back = (vis == OUTSIDE) & ~out
        vis[back] = VISIBLE
        return Pose(self.xy, vis)

    def affine(self, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> "Pose":
        xy = self.xy * scale + np.asarray(shift, dtype=np.float32)
        xy[self.vis == MISSING] = 0.0
        return Pose(xy, self.vis).refresh_outside()

    def fit_to_frame(self, margin: float = 0.1) -> "Pose":
        """Scale and centre the labelled joints' bounding box into the frame (for poses from other images)."""
        m = self.labelled
        if not m.any():
            return self.copy()
        p = self.xy[m]
        lo, hi = p.min(0), p.max(0)
        span = float(max(hi - lo)) or 1.0
        s = (1 - 2 * margin) / span
        centre = (lo + hi) / 2
        return self.affine(s, tuple(0.5 - centre * s))


# ---- flip ----------------------------------------------------------------------------------------------
def flip(pose: Pose) -> Pose:
    """Mirror horizontally: x -> 1 - x and every left/right pair swapped (the character's left stays left)."""
    xy = pose.xy.copy()
    lab = pose.vis != MISSING
    xy[lab, 0] = 1.0 - xy[lab, 0]
    # A pixel at x in [0,1) maps to 1-x in (0,1]; keep the frame test consistent via refresh_outside.
    return Pose(xy[FLIP_PERM], pose.vis[FLIP_PERM]).refresh_outside()


# ---- the original 32x32 grid tokeniser ----------------------------------------------------------------
def grid_tokens(pose: Pose, faithful_axes: bool = True) -> np.ndarray:
    """The original training code's tokens: 17 integers in [0, 1023].

    The original (``build_tensor_from_kps``) read the release's ``[a, b]`` (= [y, x] in the 512 frame),
    floor-divided each by 16, clamped it to [0, 31] and formed ``token = a + 32 * b``. So with
    ``faithful_axes=True`` (the default, as the original) the *row* y is the fast index:
    ``token = y_cell + 32 * x_cell`` - the image axes are transposed relative to the usual row-major
    ``x + 32 * y``. ``faithful_axes=False`` gives the conventional ``x_cell + 32 * y_cell``.
    A joint's cell is the one it lies in (floor), never the nearest cell corner (rounding would move 14 of
    the 17 joints of ``data/poses/1000846.json`` by a cell). Missing joints, which the release never has,
    tokenise from (0, 0).
    """
    # float64 so that a coordinate on a cell border (e.g. 256 / 512) floors to that cell exactly
    cells = np.clip(np.floor(pose.xy.astype(np.float64) * GRID), 0, GRID - 1).astype(np.int64)
    x_cell, y_cell = cells[:, 0], cells[:, 1]
    if faithful_axes:
        return y_cell + GRID * x_cell
    return x_cell + GRID * y_cell


def grid_tokens_to_pose(tokens: Iterable[int], faithful_axes: bool = True) -> Pose:
    """Inverse of :func:`grid_tokens` up to the 16-pixel cell: each joint at the centre of its cell."""
    t = np.asarray(list(tokens), dtype=np.int64)
    fast, slow = t % GRID, t // GRID
    x_cell, y_cell = (slow, fast) if faithful_axes else (fast, slow)
    xy = (np.stack([x_cell, y_cell], 1).astype(np.float32) + 0.5) / GRID
    return Pose(xy, np.full(N_JOINTS, VISIBLE, np.int8))


# ---- drawing ------------------------------------------------------------------------------------------
def draw_skeleton(pose: Pose, size: int = 256, background: Any = None, width: int | None = None,
                  draw_hidden: bool = True) -> np.ndarray:
    """Draw the pose as coloured limbs and joints; returns uint8 [size, size, 3].

    ``background``: an image array to draw on (resized to ``size``) or None for black. Left limbs are warm,
    right limbs cool; hidden joints are drawn hollow; outside and missing joints are not drawn.
    """

    if background is None:
        img = Image.new("RGB", (size, size), (0, 0, 0))
    else:
        bg = np.asarray(background)
        if bg.dtype != np.uint8:
            bg = (np.clip(bg, 0, 1) * 255).astype(np.uint8)
        img = Image.fromarray(bg).convert("RGB").resize((size, size), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    lw = width or max(1, size // 64)
    p = pose.xy * size
    show = pose.in_frame if draw_hidden else pose.vis == VISIBLE
    for (a, b), col in zip(LIMBS, LIMB_COLOURS):
        if show[a] and show[b]:
            d.line([tuple(p[a]), tuple(p[b])], fill=col, width=lw)
    r = max(1.0, lw * 0.9)
    for i in range(N_JOINTS):
        if not show[i]:
            continue
        side = "left" in JOINTS[i] and (255, 200, 0) or "right" in JOINTS[i] and (0, 200, 255) or (255, 255, 255)
        box = [p[i, 0] - r, p[i, 1] - r, p[i, 0] + r, p[i, 1] + r]
        if pose.vis[i] == HIDDEN:
            d.ellipse(box, outline=side)
        else:
            d.ellipse(box, fill=side)
    return np.asarray(img)


# ---- which way a figure faces --------------------------------------------------------------------------
VIEWS = ("front", "side", "back", "unknown")
