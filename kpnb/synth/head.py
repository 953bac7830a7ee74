"""The painter's head: back and front hair (styles, tails), face, eyes and the bow."""
from __future__ import annotations

import math

import numpy as np

from kpnb.synth.palette import _K_EYE_X, _K_EYE_Z, _K_NOSE_Z, EYE_COLOURS, HAIR_COLOURS
from kpnb.synth.shapes import _ellipse, _line_of, _perp, _pts, _shade, _unit


class _HeadParts:
    """Head methods of :class:`kpnb.synth.painter._Painter` (a mixin: it uses the painter's state)."""

    def back_hair(self) -> None:
        if not self.g["has_face"]:
            return
        g, R, s = self.g, self.R, self.g["s"]
        style = self.attrs.get("hair_style", "short")
        hair = self.hair
        # hair falls down the image, or along the body when the body lies across the image
        gravity = _unit(np.array([0.0, 1.0]) * 0.6 * abs(float(g["down"][1])) + g["down"] * 0.4, (0, 1))
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
        s = self.g["s"]
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
        self.gloss()

    def gloss(self) -> None:
        """The glossy band across the top of the hair."""
        R, s, hair = self.R, self.g["s"], self.hair
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
        if g["back"]:   # seen from behind: the back of the head is all hair
            self.poly(face, self.hair)
            self.gloss()
            return
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
