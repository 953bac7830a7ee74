"""Drawing primitives of the painter: vector helpers, capsules and ellipses as polygons, colour shades,
and the ink (outline) style."""
from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from kpnb.synth.characters import _rot2


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
