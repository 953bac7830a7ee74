"""Painting a character for any pose: :func:`render_character`. Everything is derived from the 17
keypoint positions alone (missing or outside joints included), so the keypoints sit exactly on the drawn
joints."""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..keypoints import MISSING, Pose
from .palette import (ACCENT_COLOURS, BACKGROUND_COLOURS, EYE_COLOURS, HAIR_COLOURS, LEGWEAR_COLOURS, OUTFIT_COLOURS,
                      SHIRT_COLOURS, SHOE_COLOURS, SKIN_TONES, _K_EAR, _K_EYE_X, _K_EYE_Z, _K_HIP, _K_NECK, _K_NOSE_Z,
                      _K_SH, _K_TORSO)
from .characters import _rot2


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
