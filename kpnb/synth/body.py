"""The painter's body: neck, torso and outfit, arms with sleeves, legs with legwear and shoes."""
from __future__ import annotations

import math

import numpy as np

from kpnb.synth.palette import LEGWEAR_COLOURS, SHOE_COLOURS
from kpnb.synth.shapes import _line_of, _perp, _pts, _shade, _unit


class _BodyParts:
    """Body methods of :class:`kpnb.synth.painter._Painter` (a mixin: it uses the painter's state)."""

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
