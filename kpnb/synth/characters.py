"""Drawing a character's attributes and pose: :func:`sample_attributes`, :func:`sample_pose` (a small
3-D kinematic skeleton with anime proportions, projected with a yaw and framed) and :func:`framing_of`."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from ..keypoints import HIDDEN, N_JOINTS, OUTSIDE, VISIBLE, Pose
from .palette import (ACCENT_COLOURS, BACKGROUND_COLOURS, BACKGROUND_KINDS, EYE_COLOURS, FACINGS, FRAMINGS,
                      HAIR_COLOURS, HAIR_STYLES, OUTFITS, OUTFIT_COLOURS, POSE_KINDS, SHIRT_COLOURS, SHOE_COLOURS,
                      SKIN_TONES, SLEEVES, _EAR, _EYE, _HEAD_C, _HIP, _LEN, _NOSE, _R, _SHOULDER)


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
