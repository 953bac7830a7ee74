"""Drawing a character's attributes and pose: :func:`sample_attributes`, :func:`sample_pose` (a small
3-D kinematic skeleton with anime proportions, bent, projected with a yaw, tilted and framed) and
:func:`framing_of`."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from kpnb.poses.pose import HIDDEN, N_JOINTS, OUTSIDE, VISIBLE, Pose
from kpnb.synth.palette import (
    _EAR,
    _EYE,
    _HEAD_C,
    _HIP,
    _LEN,
    _NOSE,
    _R,
    _SHOULDER,
    ACCENT_COLOURS,
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    EYE_COLOURS,
    FACINGS,
    FRAMINGS,
    HAIR_COLOURS,
    HAIR_STYLES,
    OUTFIT_COLOURS,
    OUTFITS,
    POSE_KINDS,
    SHIRT_COLOURS,
    SHOE_COLOURS,
    SKIN_TONES,
    SLEEVES,
)


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
# Poses come from two distributions: the narrow one (the kinds' classic, upright, mostly front and 3/4 views)
# and, for WIDE_SHARE of the poses, a wider one nearer to what people bring: the kinds of WIDE_KINDS, free arm
# poses, an upper body bent at the hips, the whole figure tilted, views close to the side or from behind, more
# real proportions, a side cut by the frame.
WIDE_SHARE = 0.4
WIDE_KINDS = ("kneeling", "crouching", "lying")   # drawn from the wider distribution only
_KIND_P = {"narrow": [0.24, 0.14, 0.14, 0.13, 0.12, 0.11, 0.12, 0.0, 0.0, 0.0],
           "wide": [0.25, 0.08, 0.1, 0.04, 0.04, 0.03, 0.04, 0.18, 0.16, 0.08]}
_FREE_ARM_KINDS = ("standing", "walking", "sitting", "kneeling", "crouching", "lying")


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _limb_dir(side: int, a_deg: float, f_deg: float) -> np.ndarray:
    """Unit direction of a limb: ``a`` = angle from straight down in the frontal plane, away from the body
    (90 = sideways, 180 = up, negative = across the body); ``f`` = forward swing towards the viewer."""
    a, f = math.radians(a_deg), math.radians(f_deg)
    return np.array([side * math.sin(a) * math.cos(f), math.cos(a) * math.cos(f), math.sin(f)])


Limb = tuple[tuple[float, float], tuple[float, float]]


def _arm_down(rng: np.random.Generator) -> Limb:
    a, f = _u(rng, 4, 22), _u(rng, -10, 12)
    return (a, f), (a + _u(rng, -4, 14), f + _u(rng, 0, 25))


def _leg_stand(rng: np.random.Generator, spread: float = 8) -> Limb:
    a, f = _u(rng, 1, spread), _u(rng, -4, 4)
    return (a, f), (a + _u(rng, -4, 2), f + _u(rng, -8, 0))


def _free_arm(rng: np.random.Generator) -> Limb:
    """An arm from a broad range: raised, reaching towards the viewer, the hand at the face, on the hip, at the
    chest, behind the head, or any upper-arm direction with any elbow bend up to 150 degrees."""
    how = _choice(rng, ["raised", "reach", "face", "hip", "chest", "behind_head", "any"],
                  [0.18, 0.14, 0.14, 0.08, 0.08, 0.08, 0.3])
    if how == "raised":
        a, f = _u(rng, 110, 178), _u(rng, -20, 30)
        return (a, f), (a + _u(rng, -40, 30), f + _u(rng, -20, 40))
    if how == "reach":
        a, f = _u(rng, 15, 100), _u(rng, 30, 80)
        return (a, f), (a + _u(rng, -15, 15), f + _u(rng, -10, 15))
    if how == "face":
        return (_u(rng, 8, 40), _u(rng, 25, 60)), (_u(rng, -170, -130), _u(rng, 5, 40))
    if how == "hip":
        return (_u(rng, 35, 50), _u(rng, -15, 0)), (_u(rng, -70, -40), _u(rng, -5, 10))
    if how == "chest":
        return (_u(rng, 0, 15), _u(rng, 15, 30)), (_u(rng, -130, -100), _u(rng, 30, 50))
    if how == "behind_head":
        return (_u(rng, 130, 160), _u(rng, -10, 10)), (_u(rng, -120, -80), _u(rng, -30, 0))
    ua = (_u(rng, -20, 140), _u(rng, -30, 70))
    d = _limb_dir(1, *ua)
    while True:
        fa = (ua[0] + _u(rng, -150, 150), min(ua[1] + _u(rng, -40, 80), 85.0))
        if float(np.dot(d, _limb_dir(1, *fa))) > math.cos(math.radians(150)):
            return ua, fa


# Limb angles (degrees) per pose kind, each a function filling ``ang`` after the standing defaults; the keys:
# ua/fa = upper arm/forearm, th/sn = thigh/shin, _l/_r sides.
Angles = dict[str, tuple[float, float]]


def _standing(rng: np.random.Generator, ang: Angles) -> None:
    for s in "lr":
        v = rng.random()
        if v < 0.2:   # hand on the hip
            ang["ua_" + s] = (_u(rng, 35, 50), _u(rng, -15, 0))
            ang["fa_" + s] = (_u(rng, -70, -40), _u(rng, -5, 10))
        elif v < 0.3:  # hand at the chest
            ang["ua_" + s] = (_u(rng, 0, 15), _u(rng, 15, 30))
            ang["fa_" + s] = (_u(rng, -130, -100), _u(rng, 30, 50))


def _walking(rng: np.random.Generator, ang: Angles) -> None:
    sw = _u(rng, 18, 32) * (1 if rng.random() < 0.5 else -1)
    for s, sg in (("l", 1), ("r", -1)):
        th_f = sw * sg
        ang["th_" + s] = (_u(rng, 2, 6), th_f)
        bend = _u(rng, 0, 10) if th_f > 0 else _u(rng, 25, 45)
        ang["sn_" + s] = (_u(rng, 0, 4), th_f - bend)
        ua_f = -th_f * _u(rng, 0.6, 1.0)
        ang["ua_" + s] = (_u(rng, 4, 12), ua_f)
        ang["fa_" + s] = (_u(rng, 4, 14), ua_f + _u(rng, 10, 30))


def _sitting(rng: np.random.Generator, ang: Angles) -> None:
    for s in "lr":
        a = _u(rng, 2, 10)
        ang["th_" + s] = (a, _u(rng, 72, 92))
        ang["sn_" + s] = (a * 0.5 + _u(rng, -3, 3), _u(rng, -8, 15))
        ang["ua_" + s] = (_u(rng, 5, 16), _u(rng, 8, 32))
        ang["fa_" + s] = (_u(rng, -25, 10), _u(rng, 35, 70))


def _arms_up(rng: np.random.Generator, ang: Angles) -> None:
    for s in "lr":
        a = _u(rng, 140, 172)
        ang["ua_" + s] = (a, _u(rng, -15, 5))
        ang["fa_" + s] = (a + _u(rng, -10, 20), _u(rng, -10, 10))
        ang["th_" + s], ang["sn_" + s] = _leg_stand(rng, 14)


def _arms_out(rng: np.random.Generator, ang: Angles) -> None:
    for s in "lr":
        a, f = _u(rng, 75, 105), _u(rng, -10, 15)
        ang["ua_" + s] = (a, f)
        ang["fa_" + s] = (a + _u(rng, -15, 20), f + _u(rng, -10, 15))
        ang["th_" + s], ang["sn_" + s] = _leg_stand(rng, 12)


def _arms_crossed(rng: np.random.Generator, ang: Angles) -> None:
    up = "l" if rng.random() < 0.5 else "r"
    for s in "lr":
        ang["ua_" + s] = (_u(rng, -4, 8), _u(rng, 25, 40))
        ang["fa_" + s] = (_u(rng, -100, -88) if s == up else _u(rng, -86, -74), _u(rng, 25, 45))


def _waving(rng: np.random.Generator, ang: Angles) -> None:
    s = "l" if rng.random() < 0.5 else "r"
    ang["ua_" + s] = (_u(rng, 115, 150), _u(rng, -5, 15))
    ang["fa_" + s] = (_u(rng, 165, 200), _u(rng, -10, 10))


def _kneeling(rng: np.random.Generator, ang: Angles) -> None:
    how = _choice(rng, ["upright", "on_heels", "one_knee"], [0.35, 0.35, 0.3])
    for s in "lr":   # shins back, away from the viewer; on the heels the thighs point forward
        a = _u(rng, 2, 12)
        ang["th_" + s] = (a, _u(rng, 60, 85) if how == "on_heels" else _u(rng, -5, 20))
        ang["sn_" + s] = (a * 0.5 + _u(rng, -4, 4), _u(rng, -100, -75))
        ang["ua_" + s] = (_u(rng, 5, 20), _u(rng, 5, 35))
        ang["fa_" + s] = (_u(rng, -30, 10), _u(rng, 20, 60))
    if how == "one_knee":   # one foot planted in front
        s = "l" if rng.random() < 0.5 else "r"
        ang["th_" + s] = (_u(rng, 5, 20), _u(rng, 65, 95))
        ang["sn_" + s] = (_u(rng, 0, 10), _u(rng, -10, 12))


def _crouching(rng: np.random.Generator, ang: Angles) -> None:
    for s in "lr":   # thighs forward and apart, shins down: the hips near the heels
        ang["th_" + s] = (_u(rng, 10, 40), _u(rng, 65, 100))
        ang["sn_" + s] = (_u(rng, 0, 12), _u(rng, -25, 5))
        ang["ua_" + s] = (_u(rng, 10, 30), _u(rng, 30, 55))      # hands on or past the knees
        ang["fa_" + s] = (_u(rng, -20, 15), _u(rng, 20, 55))


def _lying(rng: np.random.Generator, ang: Angles) -> None:
    if rng.random() < 0.5:   # one knee up
        s = "l" if rng.random() < 0.5 else "r"
        th_f = _u(rng, 30, 70)
        ang["th_" + s] = (_u(rng, 2, 12), th_f)
        ang["sn_" + s] = (_u(rng, 0, 8), th_f - _u(rng, 70, 110))


_KIND_ANGLES = {"standing": _standing, "walking": _walking, "sitting": _sitting, "arms_up": _arms_up,
                "arms_out": _arms_out, "arms_crossed": _arms_crossed, "waving": _waving, "kneeling": _kneeling,
                "crouching": _crouching, "lying": _lying}


def _angles(rng: np.random.Generator, kind: str, wide: bool) -> Angles:
    """Limb angles (degrees) for a pose of ``kind``: standing legs and arms down, then what the kind changes
    (:data:`_KIND_ANGLES`). In the wider distribution each arm of the kinds in _FREE_ARM_KINDS is a free arm
    with probability 0.6."""
    ang: Angles = {}
    for s in "lr":
        ang["th_" + s], ang["sn_" + s] = _leg_stand(rng)
        ang["ua_" + s], ang["fa_" + s] = _arm_down(rng)
    if kind not in _KIND_ANGLES:
        raise ValueError(f"unknown pose kind {kind!r}; valid kinds: {', '.join(POSE_KINDS)}")
    _KIND_ANGLES[kind](rng, ang)
    if wide and kind in _FREE_ARM_KINDS:
        for s in "lr":
            if rng.random() < 0.6:
                ang["ua_" + s], ang["fa_" + s] = _free_arm(rng)
    return ang


def _rot2(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def _bend(pitch: float, side: float) -> np.ndarray:
    """3-D rotation of the upper body: ``pitch`` (radians) leans it towards the viewer, ``side`` towards her
    left (+x), both about the hips."""
    cp, sp, cs, ss = math.cos(pitch), math.sin(pitch), math.cos(side), math.sin(side)
    rx = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    rz = np.array([[cs, -ss, 0], [ss, cs, 0], [0, 0, 1]])
    return rz @ rx


def _body_points(rng: np.random.Generator, kind: str, yaw: float, wide: bool) -> tuple[np.ndarray, float]:
    """The 17 joints projected to 2-D body units (x right in the image, y down) and the head yaw."""
    ang = _angles(rng, kind, wide)
    # Proportions: the anime model's, or (half the wider share) nearer a real person's: a smaller head, set
    # lower on broader shoulders.
    head, shoulders = 1.0, 1.0
    if wide and rng.random() < 0.5:
        head = _u(rng, 0.4, 1.0)
        shoulders = _u(rng, 1.0, 1.25)
    P3 = np.zeros((N_JOINTS, 3))
    for side, s in ((1, "l"), (-1, "r")):
        m = np.array([side, 1.0, 1.0])
        sh, hip = _SHOULDER * m * [shoulders, 1, 1], _HIP * m
        el = sh + _LEN["ua"] * _limb_dir(side, *ang["ua_" + s])
        wr = el + _LEN["fa"] * _limb_dir(side, *ang["fa_" + s])
        kn = hip + _LEN["th"] * _limb_dir(side, *ang["th_" + s])
        an = kn + _LEN["sn"] * _limb_dir(side, *ang["sn_" + s])
        i = 0 if side == 1 else 1
        for base, p in ((5, sh), (7, el), (9, wr), (11, hip), (13, kn), (15, an)):
            P3[base + i] = p
    # The upper body bent at the hips (arms follow the torso; the head follows half-way, as people keep
    # looking ahead): a crouching or kneeling figure leans forward, and so do some poses of the wider share.
    pitch, side_bend = 0.0, 0.0
    if kind in ("crouching", "kneeling"):
        pitch = math.radians(_u(rng, 0, 35))
    elif wide and rng.random() < 0.5:
        pitch, side_bend = math.radians(_u(rng, -5, 45)), math.radians(_u(rng, -15, 15))
    pivot = np.array([0.0, _HIP[1], 0.0])
    Rb = _bend(pitch, side_bend)
    P3[5:11] = pivot + (P3[5:11] - pivot) @ Rb.T
    neck3 = pivot + (np.array([0.0, _SHOULDER[1], 0.0]) - pivot) @ Rb.T
    neck_up = (_HEAD_C - [0.0, _SHOULDER[1], 0.0]) * (0.6 + 0.4 * head)
    head3 = neck3 + neck_up @ _bend(pitch / 2, side_bend / 2).T
    c, sn = math.cos(yaw), math.sin(yaw)

    def project(p: np.ndarray) -> np.ndarray:   # yaw about the vertical axis: towards +x (image right) when > 0
        return np.stack([p[..., 0] * c + p[..., 2] * sn, p[..., 1]], -1)

    xy = project(P3)
    neck, C0 = project(neck3), project(head3)
    # The head: its own yaw (a little off the body's; a face towards the viewer stays short of the exact side),
    # tilted about the neck; the face along the neck.
    yaw_h = yaw + _u(rng, -0.15, 0.15)
    if abs(yaw) < math.pi / 2:
        yaw_h = float(np.clip(yaw_h, -1.45, 1.45))
    ch, shh = math.cos(yaw_h), math.sin(yaw_h)
    offs = np.array([_NOSE, _EYE, _EYE * [-1, 1, 1], _EAR, _EAR * [-1, 1, 1]]) * head
    o2 = np.stack([offs[:, 0] * ch + offs[:, 2] * shh, offs[:, 1]], 1)
    up = C0 - neck
    Rh = _rot2(math.atan2(up[0], -up[1]) + _u(rng, -0.18, 0.18))
    C = neck + Rh @ np.array([0.0, -float(np.hypot(*up))])
    xy[:5] = C + o2 @ Rh.T
    # The whole figure tilted about the hips: slightly, or (wider share) up to about 35 degrees.
    tilt = float(np.clip(rng.normal(0, 0.22), -0.6, 0.6)) if wide and rng.random() < 0.5 else _u(rng, -0.06, 0.06)
    hips = (xy[11] + xy[12]) / 2
    xy = hips + (xy - hips) @ _rot2(tilt).T
    return xy, yaw_h


def _head_centre(xy: np.ndarray) -> np.ndarray:
    return (xy[3] + xy[4]) / 2


def _room(xy: np.ndarray, framing: str) -> float:
    """How far (body units) the frame's lower edge can move for a cut: for a cowboy shot, from the lower hip
    down to the lowest knee or ankle; for an upper-body shot, from the shoulders down to the higher hip."""
    if framing == "cowboy_shot":
        return float(xy[13:17, 1].max() - xy[11:13, 1].max())
    if framing == "upper_body":
        return float(xy[11:13, 1].min() - (xy[5, 1] + xy[6, 1]) / 2)
    return 1.0


def _frame(rng: np.random.Generator, xy: np.ndarray, framing: str, wide: bool) -> np.ndarray:
    """Body-unit joints placed in the 0..1 frame: the full figure, cut below the hips (cowboy shot: the frame's
    lower edge between the hips and the lowest knee or ankle) or above them (upper body); placed off-centre and
    scaled. In the wider share the figure may be shifted until a side (an arm, a shoulder) leaves the frame."""
    C = _head_centre(xy)
    top = min(C[1] - 1.25 * _R, float(xy[:, 1].min()) - 0.03)
    sh_mid, hip_mid = (xy[5] + xy[6]) / 2, (xy[11] + xy[12]) / 2
    if framing == "full_body":
        bottom = float(xy[:, 1].max()) + 0.035
        xs = np.concatenate([xy[:, 0], [C[0] - 1.35 * _R, C[0] + 1.35 * _R]])
        x0, x1 = xs.min() - 0.03, xs.max() + 0.03
        h = _u(rng, 0.5, 0.93)
        scale = min(h / (bottom - top), 0.96 / (x1 - x0))
        ox = _u(rng, 0.1, 0.9) * (1 - (x1 - x0) * scale)
        oy = _u(rng, 0.25, 0.95) * (1 - (bottom - top) * scale)
        out = (xy - [x0, top]) * scale + [ox, oy]
    else:
        room = _room(xy, framing)
        if framing == "cowboy_shot":
            cut = float(xy[11:13, 1].max()) + min(_u(rng, 0.06, 0.14), _u(rng, 0.3, 0.7) * room)
        else:
            cut = sh_mid[1] + _u(rng, 0.5, 0.85) * room
        oy = _u(rng, 0.0, 0.06)
        scale = (1 - oy) / (cut - top)    # the frame's lower edge exactly at the cut
        cx = (C[0] + sh_mid[0] + hip_mid[0]) / 3
        out = (xy - [cx, top]) * scale + [0.5 + _u(rng, -0.12, 0.12), oy]
    if wide and rng.random() < 0.3:   # a side of the figure (an arm, a shoulder) out of the frame
        stay = list(range(5)) + {"full_body": list(range(11, 17)), "cowboy_shot": [11, 12]}.get(framing, [])
        side = 1 if rng.random() < 0.5 else -1
        x, x_stay = out[:, 0] * side, out[stay, 0] * side      # side -1: mirrored, so "right" is the left edge
        edge = 1.0 if side == 1 else 0.0
        lo, hi = edge * side - x.max() + 0.02, edge * side - x_stay.max() - 0.02   # shifts that cut, keep the rest
        if lo < hi:
            out = out + [side * _u(rng, lo, hi), 0]
    return out


def sample_pose(rng: np.random.Generator, kind: str | None = None, facing: str | None = None,
                framing: str | None = None, wide_share: float = WIDE_SHARE) -> tuple[Pose, str]:
    """A pose of ``kind`` (one of POSE_KINDS; random if None), turned towards ``facing`` (front/left/right,
    the image side; random if None) and framed as ``framing`` (full_body/cowboy_shot/upper_body; random if None).

    ``wide_share`` of the poses (and every pose of WIDE_KINDS) come from the wider distribution (see above).
    A lying figure is drawn upright, framed, and turned by a right angle with its frame (her hips in the
    lower half). A pose that cannot have the asked framing (a cowboy shot of a figure with no knee or ankle
    below her hips) raises ValueError; a random framing falls back to full_body then.

    Returns the true pose (normalised; joints out of the frame OUTSIDE with their coordinates kept; the far ear
    of a turned head HIDDEN, and the nose and eyes of a figure seen from behind) and the kind.
    :func:`framing_of` and :func:`seen_from_behind` tell the framing and the view back from the pose."""
    if not 0.0 <= wide_share <= 1.0:
        raise ValueError(f"wide_share must be in [0, 1], got {wide_share}")
    wide = rng.random() < wide_share
    if kind is None:
        kind = _choice(rng, POSE_KINDS, _KIND_P["wide" if wide else "narrow"])
    if kind not in POSE_KINDS:
        raise ValueError(f"unknown pose kind {kind!r}; valid kinds: {', '.join(POSE_KINDS)}")
    wide = wide or kind in WIDE_KINDS
    facing = facing or _choice(rng, FACINGS, [0.5, 0.25, 0.25])
    if facing not in FACINGS:
        raise ValueError(f"unknown facing {facing!r}; valid: {', '.join(FACINGS)}")
    if framing is not None and framing not in FRAMINGS:
        raise ValueError(f"unknown framing {framing!r}; valid: {', '.join(FRAMINGS)}")
    behind = wide and rng.random() < 0.3   # seen from behind: straight, or turned 3/4 (never near the side)
    turn = _u(rng, 0.9, 1.3) if wide and not behind and rng.random() < 0.5 else _u(rng, 0.45, 0.9)
    yaw = {"front": _u(rng, -0.22, 0.22), "left": -turn, "right": turn}[facing]
    if behind:   # her face still turned towards the same side of the image
        yaw = math.copysign(math.pi, yaw) - yaw
    xy, yaw_h = _body_points(rng, kind, yaw, wide)
    if framing is None:
        framing = _choice(rng, FRAMINGS, [0.6, 0.15, 0.25])
        if _room(xy, framing) < 0.02:
            framing = "full_body"
    elif _room(xy, framing) < 0.02:
        raise ValueError(f"this {kind} pose has no {framing} framing: no knee or ankle below the hips, or no "
                         f"hips below the shoulders")
    xy = _frame(rng, xy, framing, wide)
    if kind == "lying":   # a right angle keeps the square frame, so what the framing left out stays out;
        # turned the way that puts her hips in the lower half of the frame
        xy = np.array([0.5, 0.5]) + (xy - 0.5) @ _rot2(math.pi / 2 * (1 if xy[11:13, 0].mean() >= 0.5 else -1)).T
    vis = np.full(N_JOINTS, VISIBLE, np.int8)
    if abs(math.sin(yaw_h)) > math.sin(0.35):   # the far ear is behind the head
        vis[3 if yaw_h > 0 else 4] = HIDDEN
    if math.cos(yaw_h) < 0:   # seen from behind: the face is turned away
        vis[:3] = HIDDEN
    return Pose(xy.astype(np.float32), vis).refresh_outside(), kind


def framing_of(pose: Pose) -> str:
    """'upper_body' when a hip is out of the frame, 'cowboy_shot' when a knee or an ankle is, else 'full_body'."""
    if (pose.vis[11:13] == OUTSIDE).any():
        return "upper_body"
    if (pose.vis[13:17] == OUTSIDE).any():
        return "cowboy_shot"
    return "full_body"


def seen_from_behind(pose: Pose) -> bool:
    """Is the face turned away (the nose HIDDEN), as :func:`sample_pose` marks a figure seen from behind?"""
    return bool(pose.vis[0] == HIDDEN)
