"""Painting a character for any pose: :func:`render_character`. Everything is derived from the 17
keypoint positions alone (missing or outside joints included), so the keypoints sit exactly on the drawn
joints."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from kpnb.poses.pose import MISSING, Pose
from kpnb.synth.body import _BodyParts
from kpnb.synth.head import _HeadParts
from kpnb.synth.palette import (
    _K_EAR,
    _K_EYE_X,
    _K_EYE_Z,
    _K_HIP,
    _K_NECK,
    _K_NOSE_Z,
    _K_SH,
    _K_TORSO,
    ACCENT_COLOURS,
    BACKGROUND_COLOURS,
    HAIR_COLOURS,
    OUTFIT_COLOURS,
    SHIRT_COLOURS,
    SKIN_TONES,
)
from kpnb.synth.shapes import _capsule, _ellipse, _Ink, _line_of, _perp, _pts, _shade, _unit


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


def _mid(P: np.ndarray, known: np.ndarray, a: int, b: int) -> np.ndarray | None:
    """The midpoint of joints a and b, or the one of them that is known (None: neither)."""
    if known[a] and known[b]:
        return (P[a] + P[b]) / 2
    if known[a] or known[b]:
        return P[a] if known[a] else P[b]
    return None


def _head_centre(P: np.ndarray, known: np.ndarray) -> tuple[np.ndarray | None, str | None]:
    """A first head centre and the joints it came from: the ears, else the eyes, the nose, any head joint."""
    if known[3] and known[4]:
        return (P[3] + P[4]) / 2, "ears"
    if known[1] and known[2]:
        return (P[1] + P[2]) / 2, "eyes"
    if known[0]:
        return P[0].copy(), "nose"
    if known[:5].any():
        return P[:5][known[:5]].mean(0), "head"
    return None, None


def _head_up(P: np.ndarray, known: np.ndarray, C: np.ndarray | None, sh_mid: np.ndarray | None,
             hip_mid: np.ndarray | None) -> np.ndarray:
    """The head's up vector: along the neck (else the torso, else the image's up), bent towards the normal of
    the eye line where the two roughly agree."""
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
    return u


def _head_radius(P: np.ndarray, known: np.ndarray, C: np.ndarray | None, src: str | None,
                 sh_mid: np.ndarray | None, hip_mid: np.ndarray | None, size: float) -> float:
    """Head radius: the body model's ratio to the torso, bounded by what the head points and the neck allow."""
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
    return float(np.clip(R, 0.012 * size, 0.45 * size))


def _head_turn(P: np.ndarray, known: np.ndarray, C: np.ndarray, src: str | None, r: np.ndarray, R: float) -> float:
    """How far the face is turned, -1..1 along ``r``: the nose's (else the eyes') offset from the ears' centre."""
    s = 0.0
    if src == "ears":
        if known[0]:
            s = float(np.dot(P[0] - C, r)) / (_K_NOSE_Z * R)
        elif known[1] and known[2]:
            s = float(np.dot((P[1] + P[2]) / 2 - C, r)) / (_K_EYE_Z * R)
    return float(np.clip(s, -1, 1))


def _fill_torso(P: np.ndarray, known: np.ndarray, C: np.ndarray, u: np.ndarray, r: np.ndarray,
                R: float) -> np.ndarray:
    """A copy of ``P`` with missing shoulders placed from the head (or mirrored from the other shoulder), then
    missing hips from the shoulders (or mirrored from the other hip)."""
    P = P.copy()
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
    return P


def _geometry(P: np.ndarray, known: np.ndarray, size: float) -> dict[str, Any] | None:
    """What the painter needs, from 17 pixel positions: head centre C, radius R, up/right vectors, turn s,
    shoulders, hips, torso axes. Missing joints are guessed from the others where the body needs them
    (``guessed``); returns None when nothing of the body can be placed."""
    sh_mid, hip_mid = _mid(P, known, 5, 6), _mid(P, known, 11, 12)
    C, src = _head_centre(P, known)
    u = _head_up(P, known, C, sh_mid, hip_mid)
    R = _head_radius(P, known, C, src, sh_mid, hip_mid, size)
    if C is None and sh_mid is not None:
        C, src = sh_mid + u * _K_NECK * R, "guess"
    if C is None:
        return None
    if src == "eyes":
        C = C + u * 0.17 * R
    elif src == "nose":
        C = C + u * 0.48 * R
    r = np.array([-u[1], u[0]])   # image-right of an upright head
    s = _head_turn(P, known, C, src, r, R)
    guessed = ~known.copy()
    P = _fill_torso(P, known, C, u, r, R)
    sh_mid, hip_mid = (P[5] + P[6]) / 2, (P[11] + P[12]) / 2
    down = _unit(hip_mid - sh_mid, -u)
    lat = _perp(down)
    sh_vec = P[5] - P[6]
    ref = sh_vec if np.hypot(*sh_vec) > 0.05 * R else r
    if float(np.dot(lat, ref)) < 0:
        lat = -lat
    # Seen from behind: her left shoulder on the image's left of her body's downward axis (the front view
    # mirrored, whichever way she leans or lies); narrow shoulders (near the side) count as a front view.
    tors = hip_mid - sh_mid
    back = bool(known[5] and known[6] and np.hypot(*sh_vec) > 0.25 * np.hypot(*tors)
                and sh_vec[0] * tors[1] - sh_vec[1] * tors[0] < 0)
    return {"P": P, "C": C, "R": R, "u": u, "r": r, "s": s, "sh_mid": sh_mid, "hip_mid": hip_mid,
            "down": down, "lat": lat, "guessed": guessed, "has_face": src in ("ears", "eyes", "nose", "head"),
            "back": back}


class _Painter(_HeadParts, _BodyParts):
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
        """Back to front: the far arm (seen from behind also an arm across her chest), the legs, the torso,
        the other arms, the head; her hair behind her, or (seen from behind) over her back."""
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
        if not g["back"]:
            self.back_hair()
        arms_front = []
        for side in (1, -1):
            hidden = side == far or self.crosses(side) if g["back"] else side == far and not self.crosses(side)
            if hidden:
                self.arm(side)
            else:
                arms_front.append(side)
        for side in ((far, -far) if far else (1, -1)):
            self.leg(side)
        self.neck()
        self.torso()
        if g["back"]:
            self.back_hair()
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
