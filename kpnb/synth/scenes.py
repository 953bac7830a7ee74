"""Distractor scenes (scenery, comic pages) and the keypoint files a pose estimator would have written:
plausible with a little jitter for suitable images, mixed, garbage or scrambled for most distractors."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from kpnb.poses.pose import MISSING, N_JOINTS, VISIBLE, Pose
from kpnb.synth.characters import WIDE_SHARE, _choice, _u, sample_attributes, sample_pose
from kpnb.synth.painter import _background, _draw_character, _shade
from kpnb.synth.palette import BACKGROUND_COLOURS, FRAMINGS, KEYPOINT_JITTER


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


def _comic(rng: np.random.Generator, S: int, wide_share: float = WIDE_SHARE
           ) -> tuple[Image.Image, Pose | None, str, list[str], bool]:
    """A comic page: white paper, bordered panels with small figures and speech bubbles. Returns the page,
    the pose of one panel's figure (page coordinates) or None, a description, tags, and monochrome or not.
    The figures' poses come from :func:`sample_pose` at ``wide_share``, as the dataset's characters'."""
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
            pose, _ = sample_pose(rng, facing=attrs["facing"], framing=_choice(rng, FRAMINGS, [0.3, 0.2, 0.5]),
                                  wide_share=wide_share)
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
