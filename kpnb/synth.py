"""The embedded procedural dataset: anime-style characters drawn from a pose and attributes, labelled
distractors and noisy Danbooru-style tags, written in the layout of the Danbooru pose-keypoint release.

Why procedural: the workbook must run offline on 2 CPU cores, so it cannot download Danbooru. Every image here
is drawn from a known pose, so the truth is exact (for the pose estimator and PCK), every candidate carries a
ground-truth label (so the filter's precision and recall can be measured) and a caption (for the domain CLIP).

* :func:`sample_attributes` and :func:`sample_pose` draw a character: hair colour and style, outfit, eyes,
  background, facing; and a pose from a small 3-D kinematic skeleton with anime proportions (a head about a
  quarter of the body height), projected with a yaw (3/4 views) and framed (full body, cowboy shot, upper body,
  off-centre, scaled). Joints outside the frame keep their coordinates and are marked OUTSIDE.
* :func:`render_character` paints a character for ANY pose (also a user's, with missing or outside joints):
  everything is derived from the 17 positions alone, so the keypoints sit exactly on the drawn joints.
* :func:`make_candidate` makes one dataset entry: a suitable image or a distractor (``multiple``, ``scenery``,
  ``comic``, ``sketch``, ``border``, ``estimator_failure``, ``rating``), the keypoint file a pose estimator
  would have written for it (plausible for suitable images, mixed/garbage/scrambled for most distractors),
  Danbooru2021-shaped metadata whose tags are noisy on purpose (a share of distractors lacks the revealing
  tag, a few suitable images carry a wrong one), and the ground-truth label.
* :func:`write_dataset` writes ``images/<id>.png``, ``keypoints/<id>.json``, ``metadata.jsonl``,
  ``labels.jsonl`` and ``dataset.json`` with worker processes; a rerun with the same settings does nothing.

Every image comes from its own ``np.random.default_rng([seed, index])``, so any number of workers gives the
same bytes. Left is the character's own left: facing the viewer, her left shoulder is on the image's right.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .keypoints import HIDDEN, MISSING, N_JOINTS, OUTSIDE, VISIBLE, Pose, write_release_json

SYNTH_VERSION = 2   # bump when the output changes, so cached datasets are redrawn
ID_BASE = 100000

# ---- palettes -----------------------------------------------------------------------------------------
# Hair colours are few and far apart so that a classifier (and CLIP) can tell them apart at 64x64.
HAIR_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 44, 48), "blue": (46, 92, 216), "green": (52, 166, 72), "pink": (250, 138, 192),
    "purple": (134, 70, 196), "blonde": (250, 214, 92), "black": (38, 32, 44), "white": (238, 238, 246),
}
# No black outfit: black hair + black dress + grey background would read as a monochrome image.
OUTFIT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (204, 40, 52), "blue": (48, 88, 204), "green": (44, 150, 84), "yellow": (246, 204, 52),
    "pink": (242, 132, 178), "purple": (128, 68, 182), "white": (246, 246, 246), "orange": (246, 140, 40),
}
SHIRT_COLOURS = {"white": (248, 248, 248), "black": (48, 46, 56), "light_blue": (172, 204, 242),
                 "grey": (170, 170, 178)}
EYE_COLOURS = {"blue": (36, 108, 232), "green": (36, 168, 88), "red": (212, 36, 48), "purple": (142, 66, 204),
               "brown": (128, 78, 38), "yellow": (232, 182, 28), "aqua": (36, 196, 206)}
SKIN_TONES = [(255, 229, 212), (252, 219, 197), (246, 206, 181), (232, 188, 158)]
SHOE_COLOURS = {"brown": (112, 70, 40), "black": (42, 40, 46), "red": (192, 40, 44), "white": (240, 240, 242)}
LEGWEAR_COLOURS = {"black": (44, 42, 52), "white": (246, 246, 250)}
ACCENT_COLOURS = [(224, 40, 56), (40, 80, 200), (250, 210, 60), (250, 250, 250), (250, 150, 190)]
# Backgrounds are light or mid tones: never near-black (the border filter looks for black rows).
BACKGROUND_COLOURS = {
    "yellow": (250, 234, 150), "sky_blue": (160, 210, 246), "mint": (172, 232, 202), "pink": (250, 202, 218),
    "lavender": (212, 196, 246), "peach": (250, 212, 178), "grey": (186, 188, 196), "white": (248, 248, 248),
    "orange": (250, 190, 118), "blue": (108, 148, 220), "green": (140, 200, 118), "brown": (176, 140, 110),
}

HAIR_STYLES = ("short", "long", "twintails", "ponytail", "bangs")
OUTFITS = ("dress", "top_skirt")
SLEEVES = ("none", "short", "long")
FACINGS = ("front", "left", "right")      # left/right: the side of the IMAGE the character turns towards
FRAMINGS = ("full_body", "cowboy_shot", "upper_body")
POSE_KINDS = ("standing", "walking", "sitting", "arms_up", "arms_out", "arms_crossed", "waving")
BACKGROUND_KINDS = ("plain", "gradient", "stripes", "dots", "floor")
DISTRACTOR_KINDS = ("multiple", "scenery", "comic", "sketch", "border", "estimator_failure", "rating")
# Shares among distractors; 'rating' (an otherwise normal image rated explicit) is ~3% of all at 0.4.
DISTRACTOR_SHARES = {"multiple": 0.18, "scenery": 0.14, "comic": 0.14, "sketch": 0.14, "border": 0.14,
                     "estimator_failure": 0.185, "rating": 0.075}
LABELS = ("suitable",) + DISTRACTOR_KINDS
TAG_NOISE = {"drop_revealing": 0.35, "wrong_revealing": 0.03, "drop_attribute": 0.06}
KEYPOINT_JITTER = 0.007  # std of the "estimator" noise on plausible keypoint files, in frame units

# ---- the body model (body height = 1; x = character's left, y = down, z = towards the viewer) -----------
_R = 0.115                                   # head radius: the head is about a quarter of the body height
_HEAD_C = np.array([0.0, 0.13, 0.0])
_EYE = np.array([0.045, 0.02, 0.085])        # left eye relative to the head centre (the right one mirrored)
_NOSE = np.array([0.0, 0.055, 0.10])
_EAR = np.array([0.105, 0.0, 0.0])
_SHOULDER = np.array([0.085, 0.285, 0.0])
_HIP = np.array([0.06, 0.53, 0.0])
_LEN = {"ua": 0.15, "fa": 0.13, "th": 0.21, "sn": 0.20}
# Ratios the painter uses to recover the head from any 17 points (in head radii): consistent with the model.
_K_TORSO = _R / float(_HIP[1] - _SHOULDER[1])          # head radius per torso length
_K_NECK = float(_SHOULDER[1] - _HEAD_C[1]) / _R         # head centre to shoulder midpoint
_K_SH, _K_HIP = float(_SHOULDER[0]) / _R, float(_HIP[0]) / _R
_K_EYE_X, _K_EYE_Z = float(_EYE[0]) / _R, float(_EYE[2]) / _R
_K_EAR = float(_EAR[0]) / _R
_K_NOSE_Z = float(_NOSE[2]) / _R


# ================================================================================================ attributes
def _choice(rng: np.random.Generator, items: Sequence[Any], p: Sequence[float] | None = None) -> Any:
    """One of ``items`` (weights ``p``, need not sum to 1); cheaper than rng.choice for small lists."""
    if p is None:
        return items[int(rng.integers(len(items)))]
    x = rng.random() * sum(p)
    for item, w in zip(items, p):
        x -= w
        if x < 0:
            return item
    return items[-1]


def _dist(a: Sequence[int], b: Sequence[int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def sample_attributes(rng: np.random.Generator) -> dict[str, Any]:
    """A character's look: colours by palette name, styles, background and facing (JSON-able)."""
    hair = _choice(rng, list(HAIR_COLOURS))
    outfit = _choice(rng, OUTFITS)
    outfit_colour = _choice(rng, list(OUTFIT_COLOURS))
    # Backgrounds far enough from the hair colour that the hair always stands out.
    bgs = [k for k, v in BACKGROUND_COLOURS.items() if _dist(v, HAIR_COLOURS[hair]) > 90]
    bg = _choice(rng, bgs)
    bg2 = _choice(rng, [k for k in bgs if k != bg])
    return {
        "hair_colour": hair,
        "hair_style": _choice(rng, HAIR_STYLES),
        "hair_length": round(float(rng.uniform(2.6, 4.2)), 3),      # long styles, in head radii
        "outfit": outfit,
        "outfit_colour": outfit_colour,
        "shirt_colour": _choice(rng, list(SHIRT_COLOURS), [0.6, 0.15, 0.15, 0.1]) if outfit == "top_skirt" else None,
        "sleeves": _choice(rng, SLEEVES, [0.3, 0.45, 0.25]),
        "skirt_length": round(float(rng.uniform(0.45, 0.95)), 3),   # share of the thigh
        "legwear": _choice(rng, ["none", "black", "white"], [0.6, 0.25, 0.15]),
        "shoe_colour": _choice(rng, list(SHOE_COLOURS)),
        "eye_colour": _choice(rng, list(EYE_COLOURS)),
        "skin": int(rng.integers(len(SKIN_TONES))),
        "accent": int(rng.integers(len(ACCENT_COLOURS))),
        "background": _choice(rng, BACKGROUND_KINDS, [0.34, 0.22, 0.14, 0.12, 0.18]),
        "background_colour": bg,
        "background_colour2": bg2,
        "bg_period": round(float(rng.uniform(0.07, 0.16)), 4),
        "bg_diagonal": bool(rng.random() < 0.5),
        "horizon": round(float(rng.uniform(0.6, 0.85)), 3),
        "facing": _choice(rng, FACINGS, [0.5, 0.25, 0.25]),
        "seat": False,
    }


# ================================================================================================ poses
def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _limb_dir(side: int, a_deg: float, f_deg: float) -> np.ndarray:
    """Unit direction of a limb: ``a`` = angle from straight down in the frontal plane, away from the body
    (90 = sideways, 180 = up, negative = across the body); ``f`` = forward swing towards the viewer."""
    a, f = math.radians(a_deg), math.radians(f_deg)
    return np.array([side * math.sin(a) * math.cos(f), math.cos(a) * math.cos(f), math.sin(f)])


def _arm_down(rng: np.random.Generator) -> tuple[tuple[float, float], tuple[float, float]]:
    a, f = _u(rng, 4, 22), _u(rng, -10, 12)
    return (a, f), (a + _u(rng, -4, 14), f + _u(rng, 0, 25))


def _leg_stand(rng: np.random.Generator, spread: float = 8) -> tuple[tuple[float, float], tuple[float, float]]:
    a, f = _u(rng, 1, spread), _u(rng, -4, 4)
    return (a, f), (a + _u(rng, -4, 2), f + _u(rng, -8, 0))


def _angles(rng: np.random.Generator, kind: str) -> dict[str, tuple[float, float]]:
    """Limb angles (degrees) per pose kind: ua/fa = upper arm/forearm, th/sn = thigh/shin; _l/_r sides."""
    ang: dict[str, tuple[float, float]] = {}
    for s in "lr":
        ang["th_" + s], ang["sn_" + s] = _leg_stand(rng)
        ang["ua_" + s], ang["fa_" + s] = _arm_down(rng)
    if kind == "standing":
        for s in "lr":
            v = rng.random()
            if v < 0.2:   # hand on the hip
                ang["ua_" + s] = (_u(rng, 35, 50), _u(rng, -15, 0))
                ang["fa_" + s] = (_u(rng, -70, -40), _u(rng, -5, 10))
            elif v < 0.3:  # hand at the chest
                ang["ua_" + s] = (_u(rng, 0, 15), _u(rng, 15, 30))
                ang["fa_" + s] = (_u(rng, -130, -100), _u(rng, 30, 50))
    elif kind == "walking":
        sw = _u(rng, 18, 32) * (1 if rng.random() < 0.5 else -1)
        for s, sg in (("l", 1), ("r", -1)):
            th_f = sw * sg
            ang["th_" + s] = (_u(rng, 2, 6), th_f)
            bend = _u(rng, 0, 10) if th_f > 0 else _u(rng, 25, 45)
            ang["sn_" + s] = (_u(rng, 0, 4), th_f - bend)
            ua_f = -th_f * _u(rng, 0.6, 1.0)
            ang["ua_" + s] = (_u(rng, 4, 12), ua_f)
            ang["fa_" + s] = (_u(rng, 4, 14), ua_f + _u(rng, 10, 30))
    elif kind == "sitting":
        for s in "lr":
            a = _u(rng, 2, 10)
            ang["th_" + s] = (a, _u(rng, 72, 92))
            ang["sn_" + s] = (a * 0.5 + _u(rng, -3, 3), _u(rng, -8, 15))
            ang["ua_" + s] = (_u(rng, 5, 16), _u(rng, 8, 32))
            ang["fa_" + s] = (_u(rng, -25, 10), _u(rng, 35, 70))
    elif kind == "arms_up":
        for s in "lr":
            a = _u(rng, 140, 172)
            ang["ua_" + s] = (a, _u(rng, -15, 5))
            ang["fa_" + s] = (a + _u(rng, -10, 20), _u(rng, -10, 10))
            ang["th_" + s], ang["sn_" + s] = _leg_stand(rng, 14)
    elif kind == "arms_out":
        for s in "lr":
            a, f = _u(rng, 75, 105), _u(rng, -10, 15)
            ang["ua_" + s] = (a, f)
            ang["fa_" + s] = (a + _u(rng, -15, 20), f + _u(rng, -10, 15))
            ang["th_" + s], ang["sn_" + s] = _leg_stand(rng, 12)
    elif kind == "arms_crossed":
        up = "l" if rng.random() < 0.5 else "r"
        for s in "lr":
            ang["ua_" + s] = (_u(rng, -4, 8), _u(rng, 25, 40))
            ang["fa_" + s] = (_u(rng, -100, -88) if s == up else _u(rng, -86, -74), _u(rng, 25, 45))
    elif kind == "waving":
        s = "l" if rng.random() < 0.5 else "r"
        ang["ua_" + s] = (_u(rng, 115, 150), _u(rng, -5, 15))
        ang["fa_" + s] = (_u(rng, 165, 200), _u(rng, -10, 10))
    else:
        raise ValueError(f"unknown pose kind {kind!r}; valid kinds: {', '.join(POSE_KINDS)}")
    return ang


def _rot2(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _body_points(rng: np.random.Generator, kind: str, yaw: float) -> tuple[np.ndarray, float]:
    """The 17 joints projected to 2-D body units (x right in the image, y down) and the head yaw."""
    ang = _angles(rng, kind)
    P3 = np.zeros((N_JOINTS, 3))
    for side, s in ((1, "l"), (-1, "r")):
        m = np.array([side, 1.0, 1.0])
        sh, hip = _SHOULDER * m, _HIP * m
        el = sh + _LEN["ua"] * _limb_dir(side, *ang["ua_" + s])
        wr = el + _LEN["fa"] * _limb_dir(side, *ang["fa_" + s])
        kn = hip + _LEN["th"] * _limb_dir(side, *ang["th_" + s])
        an = kn + _LEN["sn"] * _limb_dir(side, *ang["sn_" + s])
        i = 0 if side == 1 else 1
        for base, p in ((5, sh), (7, el), (9, wr), (11, hip), (13, kn), (15, an)):
            P3[base + i] = p
    c, sn = math.cos(yaw), math.sin(yaw)
    # Yaw about the vertical axis: the character turns towards +x (image right) when yaw > 0.
    xy = np.stack([P3[:, 0] * c + P3[:, 2] * sn, P3[:, 1]], 1)
    # The head: its own yaw (a little off the body's), tilted about the neck.
    yaw_h = yaw + _u(rng, -0.15, 0.15)
    ch, shh = math.cos(yaw_h), math.sin(yaw_h)
    offs = np.array([_NOSE, _EYE, _EYE * [-1, 1, 1], _EAR, _EAR * [-1, 1, 1]])
    o2 = np.stack([offs[:, 0] * ch + offs[:, 2] * shh, offs[:, 1]], 1)
    neck = np.array([0.0, _SHOULDER[1]])
    roll_h = _u(rng, -0.18, 0.18)
    Rh = _rot2(roll_h)
    C = neck + Rh @ (_HEAD_C[:2] - neck)
    xy[:5] = C + o2 @ Rh.T
    # A slight lean of the whole figure about the hips.
    pivot = (xy[11] + xy[12]) / 2
    xy = pivot + (xy - pivot) @ _rot2(_u(rng, -0.06, 0.06)).T
    return xy, yaw_h


def _head_centre(xy: np.ndarray) -> np.ndarray:
    return (xy[3] + xy[4]) / 2


def sample_pose(rng: np.random.Generator, kind: str | None = None, facing: str | None = None,
                framing: str | None = None) -> tuple[Pose, str]:
    """A pose of ``kind`` (one of POSE_KINDS; random if None), turned towards ``facing`` (front/left/right,
    the image side; random if None) and framed as ``framing`` (full_body/cowboy_shot/upper_body; random if None).

    Returns the true pose (normalised; joints out of the frame OUTSIDE with their coordinates kept; the far ear
    of a turned head HIDDEN) and the kind. :func:`framing_of` tells the framing back from the pose."""
    if kind is None:
        kind = _choice(rng, POSE_KINDS, [0.24, 0.14, 0.14, 0.13, 0.12, 0.11, 0.12])
    if kind not in POSE_KINDS:
        raise ValueError(f"unknown pose kind {kind!r}; valid kinds: {', '.join(POSE_KINDS)}")
    facing = facing or _choice(rng, FACINGS, [0.5, 0.25, 0.25])
    if facing not in FACINGS:
        raise ValueError(f"unknown facing {facing!r}; valid: {', '.join(FACINGS)}")
    framing = framing or _choice(rng, FRAMINGS, [0.6, 0.15, 0.25])
    if framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; valid: {', '.join(FRAMINGS)}")
    yaw = {"front": _u(rng, -0.22, 0.22), "left": -_u(rng, 0.45, 0.9), "right": _u(rng, 0.45, 0.9)}[facing]
    xy, yaw_h = _body_points(rng, kind, yaw)
    C = _head_centre(xy)
    top = C[1] - 1.25 * _R
    sh_mid, hip_mid = (xy[5] + xy[6]) / 2, (xy[11] + xy[12]) / 2
    if framing == "full_body":
        bottom = xy[15:17, 1].max() + 0.035
        xs = np.concatenate([xy[:, 0], [C[0] - 1.35 * _R, C[0] + 1.35 * _R]])
        x0, x1 = xs.min() - 0.03, xs.max() + 0.03
        h = _u(rng, 0.5, 0.93)
        scale = min(h / (bottom - top), 0.96 / (x1 - x0))
        ox = _u(rng, 0.1, 0.9) * (1 - (x1 - x0) * scale)
        oy = _u(rng, 0.25, 0.95) * (1 - (bottom - top) * scale)
        xy = (xy - [x0, top]) * scale + [ox, oy]
    else:
        torso = float(np.linalg.norm(hip_mid - sh_mid))
        if framing == "cowboy_shot":
            bottom = hip_mid[1] + _u(rng, 0.06, 0.14)
        else:
            bottom = sh_mid[1] + _u(rng, 0.5, 0.85) * torso
        scale = _u(rng, 0.92, 1.0) / (bottom - top)
        cx = (C[0] + sh_mid[0] + hip_mid[0]) / 3
        xy = (xy - [cx, top]) * scale + [0.5 + _u(rng, -0.12, 0.12), _u(rng, 0.0, 0.05)]
    vis = np.full(N_JOINTS, VISIBLE, np.int8)
    if abs(yaw_h) > 0.35:   # the far ear is behind the head
        vis[3 if yaw_h > 0 else 4] = HIDDEN
    return Pose(xy.astype(np.float32), vis).refresh_outside(), kind


def framing_of(pose: Pose) -> str:
    """'upper_body' when the hips are out of the frame, 'cowboy_shot' when the knees are, else 'full_body'."""
    if (pose.vis[11:13] == OUTSIDE).any():
        return "upper_body"
    if (pose.vis[13:17] == OUTSIDE).any():
        return "cowboy_shot"
    return "full_body"


# ================================================================================================ drawing
def _unit(v: np.ndarray, fallback: Sequence[float]) -> np.ndarray:
    n = float(np.hypot(v[0], v[1]))
    return v / n if n > 1e-6 else np.asarray(fallback, float)


def _perp(v: np.ndarray) -> np.ndarray:
    """v turned by +90 degrees in image coordinates (down (0,1) -> (1,0))."""
    return np.array([v[1], -v[0]])


def _shade(c: Sequence[int], k: float) -> tuple[int, int, int]:
    """k < 1 darker, k > 1 towards white."""
    c = np.asarray(c, float)
    out = c * k if k <= 1 else c + (255 - c) * (k - 1)
    return tuple(int(v) for v in np.clip(out, 0, 255))


@functools.lru_cache(maxsize=256)
def _line_of(c: tuple[int, int, int]) -> tuple[int, int, int]:
    """Outline colour of a fill: a dark, slightly warm version (anime line art)."""
    return tuple(min(255, int(v * 0.42 + k)) for v, k in zip(c, (18, 8, 10)))


def _pts(a: np.ndarray) -> list[float]:
    """A flat coordinate list for PIL (clipped: PIL needs sane numbers)."""
    a = np.asarray(a, float).ravel()
    if np.abs(a).max() > 4000:
        a = np.clip(a, -4000, 4000)
    return a.tolist()


_HALF = np.exp(1j * np.linspace(-np.pi / 2, np.pi / 2, 7))   # a half circle, as complex unit vectors
_HALF = np.stack([_HALF.real, _HALF.imag], 1)
_CIRCLE = {n: np.stack([np.cos(t), np.sin(t)], 1)
           for n in (16, 18, 20) for t in [np.linspace(0, 2 * np.pi, n, endpoint=False)]}


def _capsule(p0: np.ndarray, p1: np.ndarray, r0: float, r1: float) -> np.ndarray:
    """Polygon of a tapered capsule from p0 (radius r0) to p1 (radius r1)."""
    d = np.asarray(p1, float) - p0
    L = math.hypot(d[0], d[1])
    if L < 1e-3:
        return p0 + max(r0, r1) * _CIRCLE[16]
    c, s = d[0] / L, d[1] / L
    rot = np.array([[c, s], [-s, c]])     # row vectors: x' = x c - y s, y' = x s + y c
    h = _HALF @ rot
    return np.concatenate([p1 + r1 * h, p0 - r0 * h])


def _ellipse(c: np.ndarray, a: float, b: float, angle: float = 0.0, n: int = 18) -> np.ndarray:
    e = _CIRCLE[n] * [a, b]
    return c + e @ _rot2(angle).T


class _Ink:
    """Colours of a drawing style: 'colour' as given; 'lineart' = paper fills and grey lines (sketches)."""

    PAPER = (250, 249, 244)

    def __init__(self, style: str = "colour"):
        self.lineart = style == "lineart"

    def fill(self, c: Sequence[int]) -> tuple[int, int, int]:
        return self.PAPER if self.lineart else tuple(int(v) for v in c)

    def line(self, c: Sequence[int]) -> tuple[int, int, int]:
        return (70, 70, 74) if self.lineart else tuple(int(v) for v in c)

    def dark(self, c: Sequence[int]) -> tuple[int, int, int]:
        """Small dark details (pupils, lashes): kept as lines in line art."""
        return (60, 60, 64) if self.lineart else tuple(int(v) for v in c)


def _background(attrs: dict[str, Any], w: int, h: int) -> np.ndarray:
    """uint8 [h, w, 3] background from the attributes (kind, colours, period, diagonal, horizon)."""
    c1 = np.array(BACKGROUND_COLOURS[attrs.get("background_colour", "white")], np.float32)
    c2 = np.array(BACKGROUND_COLOURS[attrs.get("background_colour2", "grey")], np.float32)
    kind = attrs.get("background", "plain")
    s = float(max(w, h))
    ys = np.arange(h, dtype=np.float32)[:, None, None]     # [h, 1, 1]
    xs = np.arange(w, dtype=np.float32)[None, :, None]     # [1, w, 1]
    if kind == "gradient":
        t = ys / max(h - 1, 1)
        img = np.broadcast_to(c1 * (1 - t) + c2 * t, (h, w, 3))
    elif kind == "stripes":
        period = max(2.0, attrs.get("bg_period", 0.1) * s)
        coord = (xs + ys) if attrs.get("bg_diagonal") else xs
        img = np.where((coord / period) % 1.0 < 0.5, c1, c1 * 0.55 + c2 * 0.45)
    elif kind == "dots":
        period = max(3.0, attrs.get("bg_period", 0.1) * s)
        dx = (xs + (ys // period % 2) * period / 2) % period - period / 2
        dy = ys % period - period / 2
        img = np.where(dx * dx + dy * dy < (0.22 * period) ** 2, c2, c1)
    elif kind == "floor":
        hz = attrs.get("horizon", 0.7) * h
        t = np.clip(ys / max(hz, 1), 0, 1)
        wall = c1 * (1 - 0.25 * t) + 255 * 0.25 * t
        floor = c2 * (0.85 + 0.15 * np.clip((ys - hz) / max(h - hz, 1), 0, 1))
        col = np.where(ys < hz, wall, floor)
        col = np.where(np.abs(ys - hz) < max(1.0, s / 128), c2 * 0.6, col)
        img = np.broadcast_to(col, (h, w, 3))
    else:
        img = np.broadcast_to(c1, (h, w, 3))
    return np.ascontiguousarray(np.broadcast_to(np.clip(img, 0, 255).astype(np.uint8), (h, w, 3)))


def _geometry(P: np.ndarray, known: np.ndarray, size: float) -> dict[str, Any] | None:
    """What the painter needs, from 17 pixel positions: head centre C, radius R, up/right vectors, turn s,
    shoulders, hips, torso axes. Missing joints are guessed from the others where the body needs them
    (``guessed``); returns None when nothing of the body can be placed."""
    def mid(a: int, b: int) -> np.ndarray | None:
        if known[a] and known[b]:
            return (P[a] + P[b]) / 2
        if known[a] or known[b]:
            return P[a] if known[a] else P[b]
        return None

    sh_mid, hip_mid = mid(5, 6), mid(11, 12)
    if known[3] and known[4]:
        C, src = (P[3] + P[4]) / 2, "ears"
    elif known[1] and known[2]:
        C, src = (P[1] + P[2]) / 2, "eyes"
    elif known[0]:
        C, src = P[0].copy(), "nose"
    elif known[:5].any():
        C, src = P[:5][known[:5]].mean(0), "head"
    else:
        C, src = None, None
    if C is not None and sh_mid is not None and np.hypot(*(C - sh_mid)) > 1e-3:
        u = _unit(C - sh_mid, (0, -1))
    elif sh_mid is not None and hip_mid is not None:
        u = _unit(sh_mid - hip_mid, (0, -1))
    else:
        u = np.array([0.0, -1.0])
    if known[1] and known[2]:
        e = P[1] - P[2]
        if np.hypot(*e) > 1e-3:
            ue = _unit(np.array([e[1], -e[0]]), u)
            if float(np.dot(u, ue)) > 0.3:   # a back view or a crossed-over pose: trust the neck
                u = _unit(u + ue, u)
    # Head radius: the body model's ratio to the torso, bounded by what the head points and the neck allow.
    R_t = None
    if known[5] and known[6] and known[11] and known[12]:
        R_t = float(np.hypot(*(hip_mid - sh_mid))) * _K_TORSO
    others = []
    if known[5] and known[6]:
        others.append(np.hypot(*(P[5] - P[6])) / (2 * _K_SH))
    if known[1] and known[2]:
        others.append(np.hypot(*(P[1] - P[2])) / (2 * _K_EYE_X))
    if known[3] and known[4]:
        others.append(np.hypot(*(P[3] - P[4])) / (2 * _K_EAR))
    neck_len = None
    if src in ("ears", "eyes") and sh_mid is not None:
        neck_len = float(np.hypot(*(C - sh_mid)))
        others.append(neck_len / _K_NECK)
    R_o = float(max(others)) if others else None
    if R_t and R_o:
        R = float(np.clip(R_t, 0.7 * R_o, 1.6 * R_o))
    else:
        R = R_t or R_o or 0.08 * size
    if neck_len is not None and R_t:  # a realistic (small-headed) pose: keep the chin above the shoulders
        R = max(min(R, 0.95 * neck_len), 0.55 * R_t)
    R = float(np.clip(R, 0.012 * size, 0.45 * size))
    if C is None and sh_mid is not None:
        C, src = sh_mid + u * _K_NECK * R, "guess"
    if src == "eyes":
        C = C + u * 0.17 * R
    elif src == "nose":
        C = C + u * 0.48 * R
    r = np.array([-u[1], u[0]])   # image-right of an upright head
    s = 0.0
    if src == "ears":
        if known[0]:
            s = float(np.dot(P[0] - C, r)) / (_K_NOSE_Z * R)
        elif known[1] and known[2]:
            s = float(np.dot((P[1] + P[2]) / 2 - C, r)) / (_K_EYE_Z * R)
    s = float(np.clip(s, -1, 1))
    if C is None:
        return None
    guessed = ~known.copy()
    P = P.copy()
    # Shoulders: missing ones from the head (or mirrored from the other shoulder).
    if not known[5] and not known[6]:
        m = C - u * _K_NECK * R
        P[5], P[6] = m + r * _K_SH * R, m - r * _K_SH * R
    elif not known[5]:
        P[5] = P[6] + r * 2 * _K_SH * R
    elif not known[6]:
        P[6] = P[5] - r * 2 * _K_SH * R
    sh_mid = (P[5] + P[6]) / 2
    if not known[11] and not known[12]:
        m = sh_mid - u * R / _K_TORSO
        P[11], P[12] = m + r * _K_HIP * R, m - r * _K_HIP * R
    elif not known[11]:
        P[11] = P[12] + r * 2 * _K_HIP * R
    elif not known[12]:
        P[12] = P[11] - r * 2 * _K_HIP * R
    hip_mid = (P[11] + P[12]) / 2
    down = _unit(hip_mid - sh_mid, -u)
    lat = _perp(down)
    sh_vec = P[5] - P[6]
    ref = sh_vec if np.hypot(*sh_vec) > 0.05 * R else r
    if float(np.dot(lat, ref)) < 0:
        lat = -lat
    return {"P": P, "C": C, "R": R, "u": u, "r": r, "s": s, "sh_mid": sh_mid, "hip_mid": hip_mid,
            "down": down, "lat": lat, "guessed": guessed, "has_face": src in ("ears", "eyes", "nose", "head")}


class _Painter:
    """Draws one character on a PIL image from pixel joint positions (painter's algorithm, back to front)."""

    def __init__(self, img: Image.Image, P: np.ndarray, known: np.ndarray, attrs: dict[str, Any],
                 rng: np.random.Generator, style: str = "colour"):
        self.img, self.d = img, ImageDraw.Draw(img)
        self.attrs, self.rng, self.ink = attrs, rng, _Ink(style)
        self.known = known
        self.g = _geometry(np.asarray(P, float), known, float(max(img.size)))
        if self.g is None:
            return
        self.R = self.g["R"]
        self.ow = max(1, int(round(self.R * 0.08)))
        self.skin = SKIN_TONES[int(attrs.get("skin", 0)) % len(SKIN_TONES)]
        self.hair = HAIR_COLOURS.get(attrs.get("hair_colour", "black"), HAIR_COLOURS["black"])
        cloth = OUTFIT_COLOURS.get(attrs.get("outfit_colour", "blue"), OUTFIT_COLOURS["blue"])
        self.skirt_col = cloth
        if attrs.get("outfit") == "top_skirt":
            self.top_col = SHIRT_COLOURS.get(attrs.get("shirt_colour") or "white", SHIRT_COLOURS["white"])
        else:
            self.top_col = cloth
        self.accent = ACCENT_COLOURS[int(attrs.get("accent", 0)) % len(ACCENT_COLOURS)]

    # ---- primitives
    def poly(self, pts: np.ndarray, fill: Sequence[int], line: Sequence[int] | None = None,
             width: int | None = None) -> None:
        self.d.polygon(_pts(pts), fill=self.ink.fill(fill),
                       outline=self.ink.line(line if line is not None else _line_of(tuple(fill))),
                       width=self.ow if width is None else width)

    def chain(self, segs: list[tuple[np.ndarray, np.ndarray, float, float]], fill: Sequence[int],
              blobs: Sequence[tuple[np.ndarray, float, float, float]] = ()) -> None:
        """Capsules (and ellipse blobs) drawn as one shape: all outlines first, then all fills, so joints
        between segments show no line."""
        line, ow = self.ink.line(_line_of(tuple(fill))), self.ow
        for p0, p1, r0, r1 in segs:
            self.d.polygon(_pts(_capsule(p0, p1, r0 + ow, r1 + ow)), fill=line)
        for c, a, b, ang in blobs:
            self.d.polygon(_pts(_ellipse(c, a + ow, b + ow, ang)), fill=line)
        f = self.ink.fill(fill)
        for p0, p1, r0, r1 in segs:
            self.d.polygon(_pts(_capsule(p0, p1, r0, r1)), fill=f)
        for c, a, b, ang in blobs:
            self.d.polygon(_pts(_ellipse(c, a, b, ang)), fill=f)

    def L(self, a: float, b: float) -> np.ndarray:
        """A point in head-local units: a to the head's right (image right when upright), b up."""
        g = self.g
        return g["C"] + self.R * (a * g["r"] + b * g["u"])

    # ---- the whole figure
    def draw(self) -> None:
        if self.g is None:
            return
        g = self.g
        far = 0
        if g["s"] > 0.2:
            far = 1      # turned towards image right = to her own left: her left side is away from us
        elif g["s"] < -0.2:
            far = -1
        if self.attrs.get("seat"):
            self.seat()
        self.back_hair()
        arms_front = []
        for side in (1, -1):
            if side == far and not self.crosses(side):
                self.arm(side)
            else:
                arms_front.append(side)
        for side in ((far, -far) if far else (1, -1)):
            self.leg(side)
        self.neck()
        self.torso()
        for side in arms_front:
            self.arm(side)
        self.head()

    def crosses(self, side: int) -> bool:
        """Does this arm's wrist reach across the body's midline (then it is in front of the torso)?"""
        i = 9 if side == 1 else 10
        if not self.known[i]:
            return False
        g = self.g
        return float(np.dot(g["P"][i] - g["sh_mid"], g["lat"] * side)) < 0

    def seat(self) -> None:
        g, R, P = self.g, self.R, self.g["P"]
        xs = [P[11, 0], P[12, 0], P[13, 0], P[14, 0]]
        y0 = g["hip_mid"][1] + 0.25 * R
        y1 = max(P[15, 1], P[16, 1]) + 0.2 * R
        x0, x1 = min(xs) - 0.7 * R, max(xs) + 0.7 * R
        col = (150, 108, 76)
        self.poly(np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]), col)
        self.poly(np.array([[x0, y0], [x1, y0], [x1, y0 + 0.3 * R], [x0, y0 + 0.3 * R]]), _shade(col, 1.25))

    # ---- hair
    def back_hair(self) -> None:
        if not self.g["has_face"]:
            return
        g, R, s = self.g, self.R, self.g["s"]
        style = self.attrs.get("hair_style", "short")
        hair = self.hair
        gravity = _unit(np.array([0.0, 1.0]) * 0.6 + g["down"] * 0.4, (0, 1))
        side_v = _perp(gravity)
        if float(np.dot(side_v, g["r"])) < 0:
            side_v = -side_v
        back = -0.3 * s
        if style in ("long", "bangs"):
            Lh = R * float(self.attrs.get("hair_length", 3.2))
            top = [self.L(back + 1.2 * math.cos(t), 0.05 + 1.2 * math.sin(t)) for t in np.linspace(0, np.pi, 9)]
            cb = self.L(back, 0)
            bl, br = cb - side_v * 1.45 * R + gravity * Lh, cb + side_v * 1.45 * R + gravity * Lh
            n = 5
            hem = []
            for k in range(n + 1):
                t = k / n
                p = bl + (br - bl) * t
                jag = 0.25 * R if (k % 2 == 1 and style == "long") else 0.0
                hem.append(p - gravity * jag)
            if style == "bangs":
                hem = [bl, br]
            # polygon order: top arc (right to left), left side, hem left to right, right side
            pts = top + [self.L(back - 1.3, -0.8)] + hem + [self.L(back + 1.3, -0.8)]
            self.poly(np.array(pts), hair)
        elif style == "short":
            pts = [self.L(back + 1.2 * math.cos(t), 0.05 + 1.2 * math.sin(t)) for t in np.linspace(-0.2, np.pi + 0.2, 11)]
            pts += [self.L(back - 1.25, -0.5), self.L(back - 1.05, -1.0), self.L(back - 0.55, -0.8),
                    self.L(back + 0.55, -0.8), self.L(back + 1.05, -1.0), self.L(back + 1.25, -0.5)]
            self.poly(np.array(pts), hair)
        else:
            self.poly(_ellipse(self.L(back, 0.05), 1.18 * R, 1.18 * R, n=20), hair)
        if style == "twintails":
            Lt = R * float(self.attrs.get("hair_length", 3.2)) * 0.95
            for sd in (-1, 1):
                anchor = self.L(sd * 0.95 + back * 0.5, 0.5)
                dv = _unit(gravity + side_v * sd * 0.35, gravity)
                self.tail(anchor, dv, side_v * sd, Lt, 0.5 * R)
                self.chain([], self.accent, [(anchor, 0.2 * R, 0.2 * R, 0.0)])
        elif style == "ponytail":
            sd = -1 if s > 0.2 else (1 if s < -0.2 else (1 if self.attrs.get("accent", 0) % 2 else -1))
            anchor = self.L(sd * 0.85 if abs(s) > 0.2 else sd * 0.4, 0.8)
            dv = _unit(gravity + side_v * sd * 0.5, gravity)
            self.tail(anchor, dv, side_v * sd, R * float(self.attrs.get("hair_length", 3.2)) * 0.8, 0.45 * R)
            self.chain([], self.accent, [(anchor, 0.18 * R, 0.18 * R, 0.0)])

    def tail(self, anchor: np.ndarray, dv: np.ndarray, out: np.ndarray, length: float, width: float) -> None:
        t = np.linspace(0, 1, 9)
        centre = anchor + dv * length * t[:, None] + out * width * 0.9 * np.sin(np.pi * t)[:, None]
        w = width * (0.7 + 0.5 * np.sin(np.pi * np.minimum(t * 1.4, 1))) * (1 - 0.85 * t)
        w[0] = width * 0.6
        nrm = _perp(dv)
        left, right = centre + nrm * w[:, None], centre - nrm * w[:, None]
        self.poly(np.concatenate([left, right[::-1]]), self.hair)

    def front_hair(self) -> None:
        R, s = self.R, self.g["s"]
        style = self.attrs.get("hair_style", "short")
        hair = self.hair
        par = 0.3 * s
        cap = [self.L(-0.05 * s + 1.13 * math.cos(t), 0.05 + 1.13 * math.sin(t))
               for t in np.linspace(-0.3, np.pi + 0.3, 14)]
        if style == "bangs":
            fringe = [self.L(-1.08, 0.0), self.L(-0.95, 0.02), self.L(0.95, 0.02), self.L(1.08, 0.0)]
        else:
            n = 6
            fringe = []
            xs = np.linspace(-1.08, 1.08, 2 * n + 1) + par * (1 - np.abs(np.linspace(-1, 1, 2 * n + 1)))
            for k, a in enumerate(xs):
                if k % 2 == 1:
                    fringe.append(self.L(a, 0.02 + 0.1 * self.rng.random()))
                else:
                    fringe.append(self.L(a, 0.33 + 0.1 * self.rng.random()))
        # cap runs right -> left over the top; the fringe goes left -> right
        self.poly(np.array(cap + fringe), hair)
        if style != "ponytail":
            tip = -1.3 if style in ("long", "bangs", "twintails") else -0.95
            for sd in (-1, 1):
                if style == "short" and sd * s < -0.3:
                    continue
                lock = [self.L(sd * 1.13, 0.3), self.L(sd * 1.12, -0.55), self.L(sd * 0.98, tip),
                        self.L(sd * 0.8, -0.5), self.L(sd * 0.82, 0.15)]
                self.poly(np.array(lock), hair)
        # the glossy band
        hl = [self.L(-0.05 * s + 0.8 * math.cos(t), 0.08 + 0.8 * math.sin(t)) for t in np.linspace(0.9, 2.2, 6)]
        self.d.line(_pts(np.array(hl)), fill=self.ink.fill(_shade(hair, 1.35 if hair != HAIR_COLOURS["white"] else 0.9)),
                    width=max(1, int(0.1 * R)))

    # ---- head
    def head(self) -> None:
        g, R, s = self.g, self.R, self.g["s"]
        if not g["has_face"]:
            return
        t = np.linspace(0, 2 * np.pi, 28, endpoint=False)
        a, b = np.cos(t), -np.sin(t)   # b up; t runs clockwise on screen
        q = np.clip(-b, 0, 1)          # lower half: pinch towards the chin, which follows the turn
        a2 = a * (1 - 0.3 * q * q) + s * 0.42 * q
        b2 = b * (1 + 0.08 * q)
        face = g["C"] + R * (a2[:, None] * g["r"] + b2[:, None] * g["u"])
        self.poly(face, self.skin)
        P, known = g["P"], self.known
        for i, k in ((1, 1), (2, -1)):
            c = P[i] if known[i] else self.L(k * _K_EYE_X * math.sqrt(max(0.0, 1 - s * s)) + s * _K_EYE_Z, -0.17)
            v = c - g["C"]
            n = float(np.hypot(*v))
            if n > 0.9 * R:
                c = g["C"] + v / n * 0.9 * R
            # the far eye (on the side she turns to) is foreshortened
            squeeze = 1 - 0.45 * max(0.0, s * k)
            self.eye(c, 0.36 * R * squeeze, 0.5 * R)
        nose = P[0] if known[0] else self.L(s * _K_NOSE_Z, -0.48)
        self.d.line(_pts(np.array([nose, nose + g["u"] * -0.07 * R])), fill=self.ink.line(_line_of(self.skin)),
                    width=max(1, self.ow))
        m = self.L(s * 0.62, -0.78)
        mw = 0.16 * R
        self.d.line(_pts(np.array([m - g["r"] * mw, m + g["u"] * -0.04 * R, m + g["r"] * mw])),
                    fill=self.ink.line((150, 60, 60)), width=max(1, self.ow))
        self.front_hair()
        self.bow()

    def eye(self, c: np.ndarray, w: float, h: float) -> None:
        x, y = float(c[0]), float(c[1])
        iris = EYE_COLOURS.get(self.attrs.get("eye_colour", "blue"), EYE_COLOURS["blue"])
        d, ink = self.d, self.ink
        lw = max(1, int(round(0.12 * h)))
        d.ellipse([x - w / 2, y - h / 2, x + w / 2, y + h / 2], fill=ink.fill((255, 255, 255)),
                  outline=ink.line((60, 40, 50)), width=max(1, self.ow // 2 + 1) if not ink.lineart else 1)
        d.ellipse([x - 0.4 * w, y - 0.36 * h, x + 0.4 * w, y + 0.48 * h], fill=ink.fill(iris))
        d.ellipse([x - 0.2 * w, y - 0.08 * h, x + 0.2 * w, y + 0.3 * h], fill=ink.dark(_shade(iris, 0.4)))
        d.ellipse([x - 0.34 * w, y - 0.3 * h, x - 0.04 * w, y - 0.02 * h], fill=(255, 255, 255))
        d.line([(x - 0.62 * w, y - 0.22 * h), (x - 0.1 * w, y - 0.56 * h), (x + 0.55 * w, y - 0.4 * h)],
               fill=ink.dark((40, 26, 34)), width=lw)

    def bow(self) -> None:
        """A ribbon at the collar (anime uniforms/dresses)."""
        g, R = self.g, self.R
        c = g["sh_mid"] + g["down"] * 0.12 * R
        for sd in (-1, 1):
            p = c + g["lat"] * sd * 0.32 * R
            tri = np.array([c, p + g["down"] * 0.18 * R, p - g["down"] * 0.18 * R])
            self.poly(tri, self.accent, width=1)

    def neck(self) -> None:
        g, R = self.g, self.R
        if not g["has_face"]:
            return
        top = g["C"] - g["u"] * 0.55 * R
        self.chain([(g["sh_mid"], top, 0.17 * R, 0.16 * R)], self.skin)

    # ---- body
    def torso(self) -> None:
        g, R, P = self.g, self.R, self.g["P"]
        sh_mid, hip_mid, down, lat = g["sh_mid"], g["hip_mid"], g["down"], g["lat"]
        w_s = max(float(np.hypot(*(P[5] - P[6]))) / 2, 0.55 * R) + 0.1 * R
        w_h = max(float(np.hypot(*(P[11] - P[12]))) / 2, 0.45 * R) + 0.12 * R
        waist = sh_mid + (hip_mid - sh_mid) * 0.72
        w_w = 0.82 * w_h
        top = [sh_mid + lat * 0.3 * R - down * 0.08 * R, sh_mid + lat * w_s, sh_mid + lat * w_s + down * 0.45 * R,
               waist + lat * w_w, waist - lat * w_w,
               sh_mid - lat * w_s + down * 0.45 * R, sh_mid - lat * w_s, sh_mid - lat * 0.3 * R - down * 0.08 * R]
        # skirt: from the waist down along the thighs towards the knees
        knees = [P[13] if self.known[13] else P[11] + down * 1.8 * R, P[14] if self.known[14] else P[12] + down * 1.8 * R]
        knee_mid = (knees[0] + knees[1]) / 2
        kv = knee_mid - hip_mid
        kdir = _unit(kv, down)
        length = max(float(np.hypot(*kv)) * float(self.attrs.get("skirt_length", 0.7)), 0.9 * R)
        hem_mid = hip_mid + kdir * length
        hl = _perp(kdir)
        # same handedness as (down, lat), so the outline does not cross itself
        if (down[0] * lat[1] - down[1] * lat[0]) * (kdir[0] * hl[1] - kdir[1] * hl[0]) < 0:
            hl = -hl
        spread = abs(float(np.dot(knees[0] - knees[1], hl))) / 2
        hw = max(w_h * 1.45, spread + 0.4 * R)
        hem = [hem_mid + hl * hw * x + kdir * 0.15 * R * (1 - x * x) for x in np.linspace(1, -1, 7)]
        skirt = [waist + lat * w_w, hip_mid + lat * w_h * 1.05] + hem + [hip_mid - lat * w_h * 1.05, waist - lat * w_w]
        self.poly(np.array(top), self.top_col)
        self.poly(np.array(skirt), self.skirt_col)
        # pleats / folds
        line = self.ink.line(_line_of(self.skirt_col))
        for x in (-0.5, 0.0, 0.5):
            a = waist + lat * w_w * x * 0.8
            b = hem_mid + hl * hw * x * 0.9
            self.d.line(_pts(np.array([a + (b - a) * 0.35, b])), fill=line, width=max(1, self.ow // 2))
        # waist band
        self.d.line(_pts(np.array([waist + lat * w_w, waist - lat * w_w])), fill=line, width=max(1, self.ow))

    def arm(self, side: int) -> None:
        g, R, P, kn = self.g, self.R, self.g["P"], self.known
        sh, el, wr = (5, 7, 9) if side == 1 else (6, 8, 10)
        if not kn[el] and not kn[wr]:
            return
        p_sh = P[sh]
        p_el = P[el] if kn[el] else (p_sh + P[wr]) / 2
        segs = [(p_sh, p_el, 0.17 * R, 0.14 * R)]
        blobs = []
        if kn[wr]:
            segs.append((p_el, P[wr], 0.13 * R, 0.1 * R))
            hd = _unit(P[wr] - p_el, g["down"])
            blobs.append((P[wr] + hd * 0.16 * R, 0.19 * R, 0.15 * R, math.atan2(hd[1], hd[0])))
        sleeves = self.attrs.get("sleeves", "short")
        if sleeves == "long":
            self.chain(segs, self.top_col, [])
            self.chain([], self.skin, blobs)
            if kn[wr]:  # a cuff
                self.chain([(P[wr] - _unit(P[wr] - p_el, g["down"]) * 0.12 * R, P[wr], 0.14 * R, 0.14 * R)],
                           _shade(self.top_col, 0.85))
        else:
            self.chain(segs, self.skin, blobs)
            if sleeves == "short":
                a, b = p_sh, p_sh + (p_el - p_sh) * 0.55
                self.chain([(a, b, 0.24 * R, 0.21 * R)], self.top_col)

    def leg(self, side: int) -> None:
        g, R, P, kn = self.g, self.R, self.g["P"], self.known
        hp, kj, an = (11, 13, 15) if side == 1 else (12, 14, 16)
        if not kn[kj] and not kn[an]:
            return
        p_h = P[hp]
        p_k = P[kj] if kn[kj] else (p_h + P[an]) / 2
        segs = [(p_h, p_k, 0.25 * R, 0.17 * R)]
        if kn[an]:
            segs.append((p_k, P[an], 0.17 * R, 0.11 * R))
        self.chain(segs, self.skin)
        wear = self.attrs.get("legwear", "none")
        if wear in LEGWEAR_COLOURS:
            a = p_h + (p_k - p_h) * 0.55
            ws = [(a, p_k, 0.2 * R, 0.175 * R)]
            if kn[an]:
                ws.append((p_k, P[an], 0.175 * R, 0.115 * R))
            self.chain(ws, LEGWEAR_COLOURS[wear])
        if kn[an]:
            sd = _unit(P[an] - p_k, g["down"])
            s = g["s"]
            fwd = g["r"] * s
            c = P[an] + sd * 0.12 * R + fwd * 0.2 * R
            ang = math.atan2(fwd[1], fwd[0]) if abs(s) > 0.2 else 0.0
            self.chain([], SHOE_COLOURS.get(self.attrs.get("shoe_colour", "brown"), (110, 70, 40)),
                       [(c, (0.2 + 0.18 * abs(s)) * R, 0.15 * R, ang)])


def _draw_character(img: Image.Image, P_px: np.ndarray, known: np.ndarray, attrs: dict[str, Any],
                    rng: np.random.Generator, style: str = "colour") -> None:
    _Painter(img, P_px, known, attrs, rng, style).draw()


def render_character(pose: Pose, attrs: dict[str, Any], size: int = 256, rng: np.random.Generator | None = None,
                     background: bool = True, style: str = "colour") -> Image.Image:
    """Paint a character in ``pose`` with ``attrs`` (from :func:`sample_attributes`) at ``size`` x ``size``.

    Works for any pose: OUTSIDE joints are drawn at their (out-of-frame) positions, MISSING ones are guessed
    where the body needs them (shoulders, hips) or their limb is left out. Returns RGB with the attributes'
    background, or RGBA with a transparent background when ``background`` is False. ``style='lineart'``
    draws grey lines on paper (the sketch distractor)."""
    rng = rng if rng is not None else np.random.default_rng(0)
    if background and style == "colour":
        img = Image.fromarray(_background(attrs, size, size))
    elif background:
        img = Image.new("RGB", (size, size), _Ink.PAPER)
    else:
        img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    _draw_character(img, pose.xy.astype(float) * size, pose.vis != MISSING, attrs, rng, style)
    return img


# ================================================================================================ distractor scenes
def _scenery(rng: np.random.Generator, S: int) -> tuple[Image.Image, str, list[str]]:
    """A landscape or an empty room: no character."""
    if rng.random() < 0.6:
        top = np.array([_u(rng, 60, 140), _u(rng, 140, 200), _u(rng, 220, 255)])
        bot = np.array([_u(rng, 200, 240), _u(rng, 220, 245), _u(rng, 235, 255)])
        t = np.linspace(0, 1, S)[:, None, None]
        img = Image.fromarray(np.broadcast_to(top * (1 - t) + bot * t, (S, S, 3)).astype(np.uint8))
        d = ImageDraw.Draw(img)
        tags = ["outdoors", "sky"]
        if rng.random() < 0.6:
            c = (_u(rng, 0.1, 0.9) * S, _u(rng, 0.08, 0.3) * S)
            r = _u(rng, 0.05, 0.1) * S
            d.ellipse([c[0] - r, c[1] - r, c[0] + r, c[1] + r], fill=(255, 236, 150))
            tags.append("sun")
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = _u(rng, 0, 1) * S, _u(rng, 0.05, 0.35) * S
            for k in range(4):
                r = _u(rng, 0.03, 0.07) * S
                x = cx + (k - 1.5) * r
                d.ellipse([x - r, cy - r * 0.7, x + r, cy + r * 0.7], fill=(255, 255, 255))
            tags.append("cloud")
        horizon = _u(rng, 0.5, 0.75) * S
        if rng.random() < 0.7:
            xs = np.linspace(-0.1, 1.1, int(rng.integers(4, 9))) * S
            ys = horizon - rng.uniform(0.1, 0.35, len(xs)) * S
            mc = (int(_u(rng, 80, 140)), int(_u(rng, 100, 150)), int(_u(rng, 150, 200)))
            d.polygon([(float(x), float(y)) for x, y in zip(xs, ys)] + [(1.1 * S, horizon), (-0.1 * S, horizon)],
                      fill=mc)
            tags.append("mountain")
        gc = (int(_u(rng, 70, 130)), int(_u(rng, 150, 200)), int(_u(rng, 60, 110)))
        d.rectangle([0, horizon, S, S], fill=gc)
        for _ in range(int(rng.integers(0, 6))):
            x, y = _u(rng, 0, 1) * S, _u(rng, horizon / S, 0.95) * S
            h = _u(rng, 0.1, 0.25) * S
            d.rectangle([x - 0.015 * S, y - h * 0.4, x + 0.015 * S, y], fill=(110, 76, 46))
            d.ellipse([x - h * 0.3, y - h, x + h * 0.3, y - h * 0.3], fill=(46, 120, 56), outline=(30, 70, 36))
            tags.append("tree")
        if rng.random() < 0.35:
            x, y, w = _u(rng, 0.1, 0.7) * S, horizon + _u(rng, 0.0, 0.15) * S, _u(rng, 0.15, 0.25) * S
            d.rectangle([x, y - w * 0.7, x + w, y], fill=(230, 210, 180), outline=(90, 70, 60), width=2)
            d.polygon([(x - 0.1 * w, y - 0.7 * w), (x + 0.5 * w, y - 1.2 * w), (x + 1.1 * w, y - 0.7 * w)],
                      fill=(180, 60, 50), outline=(90, 40, 30))
            d.rectangle([x + 0.4 * w, y - 0.35 * w, x + 0.6 * w, y], fill=(120, 80, 50))
            tags.append("house")
        desc = "a landscape with " + ", ".join(sorted(set(t for t in tags if t not in ("outdoors", "sky"))) or ["a wide sky"])
    else:
        wall = np.array(BACKGROUND_COLOURS[_choice(rng, list(BACKGROUND_COLOURS))], float)
        img = Image.new("RGB", (S, S), tuple(int(v) for v in wall))
        d = ImageDraw.Draw(img)
        fy = _u(rng, 0.6, 0.8) * S
        floor = tuple(int(v) for v in _shade((150, 110, 80), _u(rng, 0.7, 1.2)))
        d.polygon([(0, fy), (S, fy), (S, S), (0, S)], fill=floor)
        for k in range(6):
            y = fy + (S - fy) * (k / 6) ** 1.5
            d.line([(0, y), (S, y)], fill=_shade(floor, 0.8), width=1)
        tags = ["indoors", "room"]
        wx, wy, ww = _u(rng, 0.1, 0.55) * S, _u(rng, 0.1, 0.25) * S, _u(rng, 0.25, 0.4) * S
        d.rectangle([wx, wy, wx + ww, wy + ww * 0.8], fill=(170, 210, 250), outline=(250, 250, 250), width=max(2, S // 64))
        d.line([(wx + ww / 2, wy), (wx + ww / 2, wy + ww * 0.8)], fill=(250, 250, 250), width=max(2, S // 80))
        d.line([(wx, wy + ww * 0.4), (wx + ww, wy + ww * 0.4)], fill=(250, 250, 250), width=max(2, S // 80))
        tags.append("window")
        if rng.random() < 0.7:
            tx, tw = _u(rng, 0.05, 0.6) * S, _u(rng, 0.25, 0.35) * S
            ty = fy + _u(rng, 0.02, 0.1) * S
            d.rectangle([tx, ty - 0.12 * S, tx + tw, ty - 0.09 * S], fill=(120, 80, 50))
            d.rectangle([tx + 0.02 * S, ty - 0.09 * S, tx + 0.04 * S, ty + 0.04 * S], fill=(100, 66, 40))
            d.rectangle([tx + tw - 0.04 * S, ty - 0.09 * S, tx + tw - 0.02 * S, ty + 0.04 * S], fill=(100, 66, 40))
            tags.append("table")
        if rng.random() < 0.5:
            px = _u(rng, 0.6, 0.9) * S
            d.rectangle([px - 0.04 * S, fy - 0.02 * S, px + 0.04 * S, fy + 0.06 * S], fill=(180, 90, 60))
            d.ellipse([px - 0.08 * S, fy - 0.16 * S, px + 0.08 * S, fy], fill=(60, 140, 70))
            tags.append("plant")
        desc = "an empty room with a window"
    return img, desc, tags


def _comic(rng: np.random.Generator, S: int) -> tuple[Image.Image, Pose | None, str, list[str], bool]:
    """A comic page: white paper, bordered panels with small figures and speech bubbles. Returns the page,
    the pose of one panel's figure (page coordinates) or None, a description, tags, and monochrome or not."""
    page = Image.new("RGB", (S, S), (252, 252, 250))
    mono = bool(rng.random() < 0.6)
    m, gut = 0.04 * S, _u(rng, 0.025, 0.045) * S
    rows = int(rng.integers(2, 4))
    hs = rng.dirichlet(np.full(rows, 4.0)) * (S - 2 * m - (rows - 1) * gut)
    panels = []
    y = m
    for h in hs:
        cols = int(rng.integers(1, 3))
        ws = rng.dirichlet(np.full(cols, 4.0)) * (S - 2 * m - (cols - 1) * gut)
        x = m
        for w in ws:
            panels.append((int(x), int(y), int(max(w, 4)), int(max(h, 4))))
            x += w + gut
        y += h + gut
    figure_pose = None
    for x, y, w, h in panels:
        if rng.random() < 0.5:
            attrs = sample_attributes(rng)
            bg = _background(attrs, w, h)
        else:
            bg = np.full((h, w, 3), 255, np.uint8)
        panel = Image.fromarray(bg.copy())
        if rng.random() < 0.8:
            attrs = sample_attributes(rng)
            pose, _ = sample_pose(rng, facing=attrs["facing"], framing=_choice(rng, FRAMINGS, [0.3, 0.2, 0.5]))
            side = min(w, h) * _u(rng, 0.8, 1.1)
            off = np.array([_u(rng, 0, max(w - side, 0)), h - side])
            P = pose.xy.astype(float) * side + off
            _draw_character(panel, P, pose.vis != MISSING, attrs, rng)
            if figure_pose is None:
                figure_pose = Pose(((P + [x, y]) / S).astype(np.float32), pose.vis).refresh_outside()
        pd = ImageDraw.Draw(panel)
        if rng.random() < 0.75:   # a speech bubble with "text"
            bw, bh = w * _u(rng, 0.35, 0.55), h * _u(rng, 0.25, 0.4)
            bx, by = _u(rng, 0, w - bw), _u(rng, 0, max(h * 0.3, 1))
            pd.ellipse([bx, by, bx + bw, by + bh], fill=(255, 255, 255), outline=(20, 20, 20), width=max(1, S // 128))
            for j in range(int(rng.integers(2, 4))):
                ly = by + bh * (0.3 + 0.18 * j)
                pd.line([(bx + bw * 0.25, ly), (bx + bw * _u(rng, 0.5, 0.75), ly)], fill=(60, 60, 60),
                        width=max(1, S // 100))
        if mono:
            panel = panel.convert("L").convert("RGB")
        page.paste(panel, (x, y))
    d = ImageDraw.Draw(page)
    for x, y, w, h in panels:
        d.rectangle([x, y, x + w - 1, y + h - 1], outline=(10, 10, 10), width=max(2, S // 90))
    desc = f"a {'black and white ' if mono else ''}comic page with {len(panels)} panels and speech bubbles"
    tags = ["comic", "speech_bubble"] + (["monochrome", "greyscale"] if mono else [])
    return page, figure_pose, desc, tags, mono


# ================================================================================================ the estimator
def _estimate(true: Pose, rng: np.random.Generator, sigma: float = KEYPOINT_JITTER) -> Pose:
    """What a good estimator outputs: the true pose with small noise. Joints in the frame stay in it, joints
    out of the frame stay out (the release keeps such values); no hidden/missing codes (the release has none)."""
    xy = true.xy.astype(np.float64) + rng.normal(0, sigma, true.xy.shape)
    inside = true.in_frame
    xy[inside] = np.clip(xy[inside], 0.0, 1.0 - 1e-3)
    now_in = ((xy >= 0) & (xy < 1)).all(1)
    back = ~inside & now_in
    xy[back] = true.xy[back]
    xy[true.vis == MISSING] = 0.5
    return Pose(xy.astype(np.float32), np.full(N_JOINTS, VISIBLE, np.int8)).refresh_outside()


def _garbage(rng: np.random.Generator) -> Pose:
    """An estimator's output on an image without a character: points scattered, or a tangled blob."""
    if rng.random() < 0.5:
        xy = rng.uniform(0.02, 0.98, (N_JOINTS, 2))
    else:
        c = rng.uniform(0.2, 0.8, 2)
        xy = c + rng.normal(0, _u(rng, 0.04, 0.15), (N_JOINTS, 2))
    return Pose(xy.astype(np.float32), np.full(N_JOINTS, VISIBLE, np.int8)).refresh_outside()


def _mix(poses: list[Pose], rng: np.random.Generator) -> Pose:
    """The estimator mixing several characters: each joint taken from one of them (at least two used)."""
    k = len(poses)
    while True:
        pick = rng.integers(0, k, N_JOINTS)
        if len(set(pick.tolist())) >= 2 and min(np.bincount(pick, minlength=k)[:2]) >= 3:
            break
    xy = np.stack([poses[p].xy[j] for j, p in enumerate(pick)])
    vis = np.array([poses[p].vis[j] for j, p in enumerate(pick)], np.int8)
    return _estimate(Pose(xy, vis).refresh_outside(), rng)


def _scramble(true: Pose, rng: np.random.Generator) -> tuple[Pose, str]:
    """A failed estimate of a normal image: permuted, partly swapped and thrown, or far-off joints."""
    for _ in range(20):
        mode = _choice(rng, ["permute", "swap_throw", "far", "collapse"], [0.35, 0.25, 0.25, 0.15])
        xy = true.xy.astype(np.float64).copy()
        if mode == "permute":
            xy = xy[rng.permutation(N_JOINTS)]
        elif mode == "swap_throw":
            for a, b in ((1, 2), (3, 4), (11, 12), (5, 6), (13, 14)):
                if rng.random() < 0.6:
                    xy[[a, b]] = xy[[b, a]]
            for j in rng.choice(N_JOINTS, int(rng.integers(3, 6)), replace=False):
                xy[j] = rng.uniform(0, 1, 2)
        elif mode == "far":
            for j in rng.choice(N_JOINTS, int(rng.integers(5, 10)), replace=False):
                xy[j] = rng.uniform(0, 1, 2)
        else:
            c = rng.uniform(0.2, 0.8, 2)
            xy = c + (xy - xy.mean(0)) * _u(rng, 0.1, 0.3) + rng.normal(0, 0.04, xy.shape)
        disp = np.linalg.norm(xy - true.xy, axis=1)
        if (disp > 0.08).sum() >= 5:
            out = Pose(xy.astype(np.float32), np.full(N_JOINTS, VISIBLE, np.int8)).refresh_outside()
            return out, mode
    out = Pose(rng.uniform(0, 1, (N_JOINTS, 2)).astype(np.float32), np.full(N_JOINTS, VISIBLE, np.int8))
    return out, "random"


# ================================================================================================ tags, captions
_KNOWN_TAG_IDS = {"1girl": 470575, "solo": 212816}
_ARTISTS = [f"synth_artist_{k:02d}" for k in range(40)]
_CHARACTERS = ["aoi_(kpnb)", "hina_(kpnb)", "mika_(kpnb)", "rin_(kpnb)", "sora_(kpnb)", "yuki_(kpnb)"]
_EXTRA_TAGS = ["smile", "blush", "closed_mouth", "open_mouth", "bow", "ribbon", "hair_ornament", "frills",
               "collarbone", "hair_between_eyes", "jewelry", "holding"]
REVEALING_TAGS = {
    "multiple": ["multiple_girls", "2girls", "3girls"],
    "scenery": ["scenery", "no_humans"],
    "comic": ["comic", "monochrome", "greyscale"],
    "sketch": ["monochrome", "greyscale", "sketch", "lineart"],
    "border": ["letterboxed", "pillarboxed", "black_border"],
}
_WRONG_TAGS = ["monochrome", "comic", "multiple_girls", "scenery", "sketch", "letterboxed"]
_HAIR_STYLE_TAGS = {"short": ["short_hair"], "long": ["long_hair"], "twintails": ["twintails", "long_hair"],
                    "ponytail": ["ponytail"], "bangs": ["blunt_bangs", "bangs", "long_hair"]}
_POSE_TAGS = {"standing": ["standing"], "walking": ["walking"], "sitting": ["sitting"],
              "arms_up": ["arms_up", "standing"], "arms_out": ["outstretched_arms", "standing"],
              "arms_crossed": ["crossed_arms", "standing"], "waving": ["waving", "standing"]}
_POSE_WORDS = {"standing": "standing", "walking": "walking", "sitting": "sitting", "arms_up": "with arms up",
               "arms_out": "with arms spread out", "arms_crossed": "with arms crossed", "waving": "waving"}
_BG_TAGS = {"plain": ["simple_background"], "gradient": ["gradient_background"],
            "stripes": ["striped_background"], "dots": ["polka_dot_background"], "floor": ["indoors"]}


def tag_id(name: str) -> str:
    """A stable made-up Danbooru tag id (the two best-known real ones kept)."""
    return str(_KNOWN_TAG_IDS.get(name, 1_000_000 + zlib.crc32(name.encode()) % 9_000_000))


def _words(name: str) -> str:
    return name.replace("_", " ")


def _character_tags(attrs: dict[str, Any], kind: str, framing: str) -> list[str]:
    t = [f"{attrs['hair_colour']}_hair"] + _HAIR_STYLE_TAGS[attrs["hair_style"]]
    c = attrs["outfit_colour"]
    if attrs["outfit"] == "dress":
        t += ["dress", f"{c}_dress"]
    else:
        t += ["skirt", f"{c}_skirt", "shirt", f"{attrs['shirt_colour']}_shirt"]
    t.append(f"{attrs['eye_colour']}_eyes")
    t.append({"none": "sleeveless", "short": "short_sleeves", "long": "long_sleeves"}[attrs["sleeves"]])
    if attrs["legwear"] != "none":
        t += ["thighhighs", f"{attrs['legwear']}_thighhighs"]
    t += _POSE_TAGS[kind] + [framing]
    t.append("looking_at_viewer" if attrs["facing"] == "front" else "looking_to_the_side")
    bg = attrs["background"]
    t += _BG_TAGS[bg] + ([f"{attrs['background_colour']}_background"] if bg == "plain" else [])
    if framing == "full_body" and attrs["seat"]:
        t.append("chair")
    return t


def _hair_words(attrs: dict[str, Any]) -> str:
    length = {"short": "short", "long": "long", "twintails": "long", "ponytail": "", "bangs": "long"}[attrs["hair_style"]]
    return " ".join(w for w in (length, _words(attrs["hair_colour"]), "hair") if w)


def _outfit_words(attrs: dict[str, Any]) -> str:
    if attrs["outfit"] == "dress":
        return f"a {_words(attrs['outfit_colour'])} dress"
    return f"a {_words(attrs['shirt_colour'])} shirt and a {_words(attrs['outfit_colour'])} skirt"


def _background_words(attrs: dict[str, Any]) -> str:
    c, c2 = _words(attrs["background_colour"]), _words(attrs["background_colour2"])
    return {"plain": f"plain {c} background", "gradient": f"{c} to {c2} gradient background",
            "stripes": f"{c} striped background", "dots": f"{c} polka dot background",
            "floor": f"{c} wall and {c2} floor"}[attrs["background"]]


def caption_of(attrs: dict[str, Any], kind: str, framing: str, rng: np.random.Generator) -> str:
    """One of several caption templates from the attributes, pose kind and framing."""
    style_extra = {"twintails": "twin tails", "ponytail": "a ponytail", "bangs": "blunt bangs"}.get(attrs["hair_style"])
    facing = {"front": "facing the viewer", "left": "turned to the left", "right": "turned to the right"}[attrs["facing"]]
    frame = {"full_body": "full body", "cowboy_shot": "cowboy shot", "upper_body": "upper body"}[framing]
    hair, outfit, pose, bg = _hair_words(attrs), _outfit_words(attrs), _POSE_WORDS[kind], _background_words(attrs)
    hair_full = hair + (f" in {style_extra}" if style_extra else "")
    templates = [
        f"a girl with {hair_full} and {outfit}, {pose}, {bg}",
        f"anime girl, {hair_full}, {_words(attrs['eye_colour'])} eyes, {outfit}, {pose}, {facing}, {frame}, {bg}",
        f"an illustration of a girl {pose} in {outfit}; she has {hair_full}. {bg}",
        f"{frame} drawing of a girl with {hair_full} wearing {outfit}, {pose}, {facing}",
    ]
    return templates[int(rng.integers(len(templates)))]


def _meta(iid: str, general: list[str], rating: str, size: int, rng: np.random.Generator,
          meta_tags: Sequence[str] = ()) -> dict[str, Any]:
    """A Danbooru2021-shaped record (strings, like the real dump)."""
    tags = [(n, "0") for n in sorted(set(general))]
    tags.append(("original", "3"))
    tags.append((_choice(rng, _ARTISTS), "1"))
    if "1girl" in general and rng.random() < 0.25:
        tags.append((_choice(rng, _CHARACTERS), "4"))
    if rng.random() < 0.4:
        tags.append(("highres", "5"))
    for n in meta_tags:
        tags.append((n, "5"))
    return {"id": iid, "tags": [{"id": tag_id(n), "name": n, "category": c} for n, c in tags], "rating": rating,
            "image_width": str(size), "image_height": str(size), "file_ext": "png"}


# ================================================================================================ candidates
def _sample_label(rng: np.random.Generator, distractor_frac: float) -> str:
    if rng.random() >= distractor_frac:
        return "suitable"
    return _choice(rng, list(DISTRACTOR_SHARES), list(DISTRACTOR_SHARES.values()))


def _character(rng: np.random.Generator, framing: str | None = None) -> tuple[dict[str, Any], Pose, str]:
    attrs = sample_attributes(rng)
    pose, kind = sample_pose(rng, facing=attrs["facing"], framing=framing)
    attrs["seat"] = kind == "sitting"
    attrs["framing"] = framing_of(pose)
    return attrs, pose, kind


def make_candidate(index: int, seed: int, image_size: int, render_size: int,
                   distractor_frac: float = 0.4) -> dict[str, Any]:
    """One dataset entry: ``image`` (PIL RGB, image_size square), ``est_pose`` (the keypoint file's pose),
    ``meta`` (Danbooru-shaped record) and ``label`` (ground truth). Deterministic in (seed, index)."""
    rng = np.random.default_rng([int(seed), int(index)])
    iid = str(ID_BASE + int(index))
    S = int(render_size)
    label = _sample_label(rng, distractor_frac)
    revealing: list[str] = []
    meta_tags: list[str] = []
    attrs: dict[str, Any] = {}
    kind: str | None = None
    true: Pose | None = None
    general: list[str] = []
    if label in ("suitable", "estimator_failure", "rating", "sketch", "border"):
        attrs, true, kind = _character(rng)
        caption = caption_of(attrs, kind, attrs["framing"], rng)
        general = ["1girl", "solo"] + _character_tags(attrs, kind, attrs["framing"])
        if label == "sketch":
            lineart = bool(rng.random() < 0.6)
            if lineart:
                img = render_character(true, attrs, S, rng, style="lineart")
                revealing = ["monochrome", "sketch", "lineart"]
            else:
                img = render_character(true, attrs, S, rng).convert("L").convert("RGB")
                revealing = ["monochrome", "greyscale"]
            colours = {*HAIR_COLOURS, *OUTFIT_COLOURS, *SHIRT_COLOURS, *EYE_COLOURS, *BACKGROUND_COLOURS}
            general = [t for t in general if not any(t.startswith(c + "_") for c in colours)]  # no colour seen
            attrs["sketch"] = "lineart" if lineart else "greyscale"
            caption = ("a monochrome line sketch of " if lineart else "a greyscale drawing of ") + \
                f"a girl {_POSE_WORDS[kind]}, {_words(attrs['framing'])}"
            est = _estimate(true, rng)
        elif label == "border":
            img, true = _bordered(rng, attrs, true, S)
            revealing = ["black_border", "letterboxed" if attrs["border"] == "letterbox" else "pillarboxed"]
            caption = caption + ", with thick black borders"
            est = _estimate(true, rng)
        else:
            img = render_character(true, attrs, S, rng)
            if label == "estimator_failure":
                est, mode = _scramble(true, rng)
                attrs["failure"] = mode
            else:
                est = _estimate(true, rng)
    elif label == "multiple":
        n = 2 if rng.random() < 0.7 else 3
        chars = [_character(rng, framing="full_body") for _ in range(n)]
        attrs = chars[0][0]
        img = Image.fromarray(_background(attrs, S, S))
        poses = []
        order = rng.permutation(n)
        for j in range(n):
            p = chars[j][1]
            k_scale = _u(rng, 0.55, 0.8) if n == 2 else _u(rng, 0.42, 0.6)
            x0, _, x1, y1 = p.bbox()
            slot = (j + 0.5) / n + _u(rng, -0.06, 0.06)
            shift = (slot - (x0 + x1) / 2 * k_scale, _u(rng, 0.86, 0.97) - y1 * k_scale)
            poses.append(p.affine(k_scale, shift))
        for j in order:
            _draw_character(img, poses[j].xy.astype(float) * S, poses[j].vis != MISSING, chars[j][0], rng)
        true = poses[0]
        kind = chars[0][2]
        est = _mix(poses, rng)
        hairs = [_words(c[0]["hair_colour"]) for c in chars]
        caption = f"{n} girls side by side, with {' and '.join(hairs)} hair, {_background_words(attrs)}"
        general = [f"{c[0]['hair_colour']}_hair" for c in chars] + ["dress" if c[0]["outfit"] == "dress" else "skirt" for c in chars]
        revealing = ["multiple_girls", f"{n}girls"]
        attrs = {"n_characters": n, "hair_colours": [c[0]["hair_colour"] for c in chars],
                 "background": attrs["background"], "background_colour": attrs["background_colour"]}
    elif label == "scenery":
        img, caption, general = _scenery(rng, S)
        revealing = ["scenery", "no_humans"]
        est = _garbage(rng)
        attrs = {"scene": "outdoor" if "outdoors" in general else "room"}
    else:  # comic
        img, fig, caption, general, mono = _comic(rng, S)
        revealing = [t for t in general if t in REVEALING_TAGS["comic"]]
        general = [t for t in general if t not in revealing]
        meta_tags = ["translated"] if rng.random() < 0.3 else []
        true = fig
        est = _estimate(fig, rng, 0.004) if fig is not None and rng.random() < 0.65 else _garbage(rng)
        attrs = {"monochrome": mono}
    # ---- noisy tags: attribute tags sometimes missing, revealing tags missing for a share of distractors,
    # a few suitable images with a wrong revealing tag
    general = [t for t in general if t in ("1girl", "solo") or rng.random() >= TAG_NOISE["drop_attribute"]]
    general += [str(t) for t in rng.choice(_EXTRA_TAGS, int(rng.integers(0, 4)), replace=False)]
    tags_dropped = False
    if revealing:
        if rng.random() < TAG_NOISE["drop_revealing"]:
            tags_dropped = True
        else:
            general += revealing
    if label == "suitable" and rng.random() < TAG_NOISE["wrong_revealing"]:
        general.append(_choice(rng, _WRONG_TAGS))
    rating = "e" if label == "rating" else _choice(rng, ["g", "s", "q"], [0.55, 0.4, 0.05])
    # Lanczos after a box pre-reduction (reducing_gap): antialiased and ~3x cheaper than plain Lanczos.
    image = img.convert("RGB")
    if image_size != S:
        image = image.resize((image_size, image_size), Image.LANCZOS, reducing_gap=2.0)
    meta = _meta(iid, general, rating, image_size, rng, meta_tags)
    lab = {"id": iid, "label": label, "suitable": label == "suitable", "caption": caption,
           "attributes": attrs, "pose_kind": kind, "revealing_tags_dropped": tags_dropped,
           "true_pose": None if true is None else [[round(float(x), 5), round(float(y), 5), int(v)]
                                                   for (x, y, v) in true.to_array()]}
    return {"image": image, "est_pose": est, "meta": meta, "label": lab}


def _bordered(rng: np.random.Generator, attrs: dict[str, Any], pose: Pose, S: int) -> tuple[Image.Image, Pose]:
    """Big black borders around a small picture: letterbox (bars top and bottom) or a window (all sides)."""
    letter = bool(rng.random() < 0.5)
    attrs["border"] = "letterbox" if letter else "window"
    if letter:
        h = _u(rng, 0.3, 0.45)
        w = min(1.0, h * _u(rng, 1.4, 2.2))
    else:
        w = h = _u(rng, 0.35, 0.55)
    cw, ch = max(4, int(w * S)), max(4, int(h * S))
    ox, oy = (S - cw) // 2 + int(_u(rng, -0.05, 0.05) * S * (1 - w)), (S - ch) // 2
    ox = int(np.clip(ox, 0, S - cw))
    content = Image.fromarray(_background(attrs, cw, ch))
    # the character's own square frame fitted to the content's height, centred
    P = pose.xy.astype(float) * ch + [(cw - ch) / 2, 0]
    _draw_character(content, P, pose.vis != MISSING, attrs, rng)
    img = Image.new("RGB", (S, S), (0, 0, 0))
    img.paste(content, (ox, oy))
    # The release knows the whole frame, not the window: a joint cut off by the window but inside the frame
    # keeps its (in-frame) position, as an estimator would place it.
    return img, Pose(((P + [ox, oy]) / S).astype(np.float32), pose.vis.copy()).refresh_outside()


# ================================================================================================ the dataset
def _settings(n: int, image_size: int, render_size: int, seed: int, distractor_frac: float) -> dict[str, Any]:
    return {"generator": "kpnb.synth", "version": SYNTH_VERSION, "n": int(n), "seed": int(seed),
            "image_size": int(image_size), "render_size": int(render_size),
            "distractor_frac": float(distractor_frac), "distractor_shares": DISTRACTOR_SHARES,
            "tag_noise": TAG_NOISE, "keypoint_jitter": KEYPOINT_JITTER, "id_base": ID_BASE}


def _work(job: tuple[int, int, int, int, float, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    index, seed, image_size, render_size, frac, out = job
    c = make_candidate(index, seed, image_size, render_size, frac)
    iid = c["meta"]["id"]
    c["image"].save(os.path.join(out, "images", f"{iid}.png"))
    write_release_json(c["est_pose"], os.path.join(out, "keypoints", f"{iid}.json"))
    return c["meta"], c["label"]


def _complete(out: Path, settings: dict[str, Any]) -> bool:
    try:
        old = json.loads((out / "dataset.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if old.get("settings") != json.loads(json.dumps(settings)):
        return False
    if not (out / "metadata.jsonl").exists() or not (out / "labels.jsonl").exists():
        return False
    ids = [str(ID_BASE + i) for i in range(settings["n"])]
    return all((out / "images" / f"{i}.png").exists() and (out / "keypoints" / f"{i}.json").exists() for i in ids)


def write_dataset(out_dir: str | Path, n: int, image_size: int = 64, render_size: int = 256, seed: int = 0,
                  distractor_frac: float = 0.4, workers: int = 2, progress: bool = True) -> dict[str, Any]:
    """Write ``n`` candidates into ``out_dir`` (release layout + metadata.jsonl + labels.jsonl + dataset.json).

    ``dataset.json`` is written last, so it marks a finished dataset: when it holds the same settings and every
    file is there, nothing is redone. ``workers`` processes draw in parallel (identical output for any count).
    Returns a summary: counts per label, seconds, images/s, and whether the work was skipped."""
    from tqdm.auto import tqdm

    if n < 0 or image_size < 1 or render_size < 1:
        raise ValueError(f"n, image_size and render_size must be positive (got {n}, {image_size}, {render_size})")
    if not 0.0 <= distractor_frac <= 1.0:
        raise ValueError(f"distractor_frac must be in [0, 1], got {distractor_frac}")
    out = Path(out_dir)
    settings = _settings(n, image_size, render_size, seed, distractor_frac)
    if _complete(out, settings):
        info = json.loads((out / "dataset.json").read_text())
        return {**info["summary"], "out_dir": str(out), "skipped": True}
    t0 = time.time()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "keypoints").mkdir(parents=True, exist_ok=True)
    (out / "dataset.json").unlink(missing_ok=True)
    wanted = {str(ID_BASE + i) for i in range(n)}
    for folder, ext in (("images", ".png"), ("keypoints", ".json")):   # stale files of an earlier, larger run
        for p in (out / folder).iterdir():
            if p.suffix == ext and p.stem.isdigit() and p.stem not in wanted:
                p.unlink()
    jobs = [(i, seed, image_size, render_size, distractor_frac, str(out)) for i in range(n)]
    bar = tqdm(total=n, desc="synthetic dataset", disable=not progress, mininterval=1.0)
    results: list[tuple[dict[str, Any], dict[str, Any]]] = []
    if workers and workers > 1 and n > 1:
        import multiprocessing as mp

        # fork where it is safe (Linux): no re-import of the caller's script, so it works from a notebook, a
        # script without a main guard or stdin. The workers use only numpy and PIL, never torch's thread pool.
        # macOS/Windows: spawn.
        import sys

        method = "fork" if sys.platform.startswith("linux") else "spawn"
        with mp.get_context(method).Pool(workers) as pool:
            for r in pool.imap(_work, jobs, chunksize=max(1, min(64, n // (workers * 8) or 1))):
                results.append(r)
                bar.update(1)
    else:
        for j in jobs:
            results.append(_work(j))
            bar.update(1)
    bar.close()
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        for meta, _ in results:
            f.write(json.dumps(meta) + "\n")
    with open(out / "labels.jsonl", "w", encoding="utf-8") as f:
        for _, lab in results:
            f.write(json.dumps(lab) + "\n")
    counts: dict[str, int] = {k: 0 for k in LABELS}
    for _, lab in results:
        counts[lab["label"]] += 1
    secs = time.time() - t0
    summary = {"n": n, "counts": counts, "n_suitable": counts["suitable"], "seconds": round(secs, 2),
               "images_per_s": round(n / secs, 1) if secs > 0 else None, "workers": workers}
    (out / "dataset.json").write_text(json.dumps({"settings": settings, "summary": summary}, indent=1))
    return {**summary, "out_dir": str(out), "skipped": False}


def main(argv: list[str] | None = None) -> int:
    """``kpnb synth --out DIR --n N --size S --seed K [--render-size R] [--distractor-frac F] [--workers W]``"""
    p = argparse.ArgumentParser(prog="kpnb synth", description="write kpnb's synthetic dataset (release layout)")
    p.add_argument("--out", required=True, help="dataset folder to write")
    p.add_argument("--n", type=int, default=6000, help="number of candidates")
    p.add_argument("--size", type=int, default=64, help="image size in pixels (square)")
    p.add_argument("--render-size", type=int, default=None, help="drawing size before downsampling (default 4x size, at most 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--distractor-frac", type=float, default=0.4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    render = a.render_size or min(512, max(a.size, 4 * a.size))
    try:
        s = write_dataset(a.out, a.n, a.size, render, a.seed, a.distractor_frac, a.workers, a.progress)
    except ValueError as e:
        print(f"kpnb synth: {e}")
        return 2
    verb = "already there (same settings), nothing to do" if s["skipped"] else f"written in {s['seconds']} s"
    print(f"kpnb synth: {s['n']} candidates in {s['out_dir']}: {verb}")
    print("  labels: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items()))
    return 0


__all__ = ["HAIR_COLOURS", "OUTFIT_COLOURS", "HAIR_STYLES", "DISTRACTOR_KINDS", "DISTRACTOR_SHARES", "LABELS",
           "POSE_KINDS", "FACINGS", "FRAMINGS", "sample_attributes", "sample_pose", "framing_of",
           "render_character", "make_candidate", "write_dataset", "caption_of", "tag_id", "main"]
