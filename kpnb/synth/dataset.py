"""One dataset entry (:func:`make_candidate`) and the dataset writer (:func:`write_dataset`): images,
keypoint files, metadata, labels, written by worker processes; a rerun with the same settings does
nothing. Every image comes from its own ``np.random.default_rng([seed, index])``, so any number of
workers gives the same bytes."""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from kpnb.core import progress as kprogress
from kpnb.poses.formats import write_release_json
from kpnb.poses.pose import MISSING, Pose
from kpnb.synth.characters import WIDE_SHARE, _choice, _u, framing_of, sample_attributes, sample_pose, seen_from_behind
from kpnb.synth.painter import _background, _draw_character, render_character
from kpnb.synth.palette import (
    BACKGROUND_COLOURS,
    DISTRACTOR_SHARES,
    EYE_COLOURS,
    HAIR_COLOURS,
    ID_BASE,
    KEYPOINT_JITTER,
    LABELS,
    OUTFIT_COLOURS,
    SHIRT_COLOURS,
    SYNTH_VERSION,
    TAG_NOISE,
)
from kpnb.synth.scenes import _comic, _estimate, _garbage, _mix, _scenery, _scramble
from kpnb.synth.tags import (
    _EXTRA_TAGS,
    _POSE_WORDS,
    _WRONG_TAGS,
    REVEALING_TAGS,
    _background_words,
    _character_tags,
    _meta,
    _words,
    caption_of,
)


# ================================================================================================ candidates
def _sample_label(rng: np.random.Generator, distractor_frac: float) -> str:
    if rng.random() >= distractor_frac:
        return "suitable"
    return _choice(rng, list(DISTRACTOR_SHARES), list(DISTRACTOR_SHARES.values()))


def _character(rng: np.random.Generator, framing: str | None = None, wide_share: float = WIDE_SHARE
               ) -> tuple[dict[str, Any], Pose, str]:
    attrs = sample_attributes(rng)
    pose, kind = sample_pose(rng, facing=attrs["facing"], framing=framing, wide_share=wide_share)
    attrs["seat"] = kind == "sitting"
    attrs["framing"] = framing_of(pose)
    attrs["from_behind"] = seen_from_behind(pose)
    return attrs, pose, kind


@dataclass
class _Drawing:
    """A candidate's picture and what its files will say about it, before the tag noise."""
    img: Image.Image
    est: Any                        # the keypoint file's pose (a Pose, or garbage from a failed estimator)
    caption: str
    general: list[str]              # Danbooru general tags
    revealing: list[str]            # the tags that give a distractor away (dropped for a share of them)
    attrs: dict[str, Any]
    true: Pose | None = None        # the ground-truth pose, where there is a figure
    kind: str | None = None         # its pose kind
    meta_tags: list[str] = field(default_factory=list)


_ONE_CHARACTER = ("suitable", "estimator_failure", "rating", "sketch", "border")


def _sketch(rng: np.random.Generator, true: Pose, attrs: dict[str, Any], kind: str, general: list[str],
            S: int) -> _Drawing:
    """A line sketch or a greyscale drawing of the character: no colour tag, a caption that says so."""
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
    return _Drawing(img, _estimate(true, rng), caption, general, revealing, attrs, true, kind)


def _one_character(rng: np.random.Generator, label: str, S: int, wide_share: float) -> _Drawing:
    """One character: a suitable image, or a distractor of one figure (sketch, border, a failed estimator,
    an explicit rating)."""
    attrs, true, kind = _character(rng, wide_share=wide_share)
    caption = caption_of(attrs, kind, attrs["framing"], rng)
    general = ["1girl", "solo"] + _character_tags(attrs, kind, attrs["framing"])
    if label == "sketch":
        return _sketch(rng, true, attrs, kind, general, S)
    if label == "border":
        img, true = _bordered(rng, attrs, true, S)
        revealing = ["black_border", "letterboxed" if attrs["border"] == "letterbox" else "pillarboxed"]
        return _Drawing(img, _estimate(true, rng), caption + ", with thick black borders", general, revealing,
                        attrs, true, kind)
    img = render_character(true, attrs, S, rng)
    if label == "estimator_failure":
        est, mode = _scramble(true, rng)
        attrs["failure"] = mode
    else:
        est = _estimate(true, rng)
    return _Drawing(img, est, caption, general, [], attrs, true, kind)


def _several_characters(rng: np.random.Generator, S: int, wide_share: float) -> _Drawing:
    """Two or three full-body girls side by side on the first one's background."""
    n = 2 if rng.random() < 0.7 else 3
    chars = [_character(rng, framing="full_body", wide_share=wide_share) for _ in range(n)]
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
    est = _mix(poses, rng)
    hairs = [_words(c[0]["hair_colour"]) for c in chars]
    caption = f"{n} girls side by side, with {' and '.join(hairs)} hair, {_background_words(attrs)}"
    general = ([f"{c[0]['hair_colour']}_hair" for c in chars]
               + ["dress" if c[0]["outfit"] == "dress" else "skirt" for c in chars])
    attrs = {"n_characters": n, "hair_colours": [c[0]["hair_colour"] for c in chars],
             "background": attrs["background"], "background_colour": attrs["background_colour"]}
    return _Drawing(img, est, caption, general, ["multiple_girls", f"{n}girls"], attrs, poses[0], chars[0][2])


def _scenery_drawing(rng: np.random.Generator, S: int) -> _Drawing:
    img, caption, general = _scenery(rng, S)
    return _Drawing(img, _garbage(rng), caption, general, ["scenery", "no_humans"],
                    {"scene": "outdoor" if "outdoors" in general else "room"})


def _comic_drawing(rng: np.random.Generator, S: int, wide_share: float) -> _Drawing:
    img, fig, caption, general, mono = _comic(rng, S, wide_share)
    revealing = [t for t in general if t in REVEALING_TAGS["comic"]]
    general = [t for t in general if t not in revealing]
    meta_tags = ["translated"] if rng.random() < 0.3 else []
    est = _estimate(fig, rng, 0.004) if fig is not None and rng.random() < 0.65 else _garbage(rng)
    return _Drawing(img, est, caption, general, revealing, {"monochrome": mono}, true=fig, meta_tags=meta_tags)


def _noisy_tags(rng: np.random.Generator, label: str, d: _Drawing) -> tuple[list[str], bool]:
    """(general tags, whether the revealing tags were dropped): attribute tags sometimes missing, revealing tags
    missing for a share of distractors, a few suitable images with a wrong revealing tag."""
    general = [t for t in d.general if t in ("1girl", "solo") or rng.random() >= TAG_NOISE["drop_attribute"]]
    general += [str(t) for t in rng.choice(_EXTRA_TAGS, int(rng.integers(0, 4)), replace=False)]
    dropped = False
    if d.revealing:
        if rng.random() < TAG_NOISE["drop_revealing"]:
            dropped = True
        else:
            general += d.revealing
    if label == "suitable" and rng.random() < TAG_NOISE["wrong_revealing"]:
        general.append(_choice(rng, _WRONG_TAGS))
    return general, dropped


def make_candidate(index: int, seed: int, image_size: int, render_size: int,
                   distractor_frac: float = 0.4, wide_share: float = WIDE_SHARE) -> dict[str, Any]:
    """One dataset entry: ``image`` (PIL RGB, image_size square), ``est_pose`` (the keypoint file's pose),
    ``meta`` (Danbooru-shaped record) and ``label`` (ground truth). Deterministic in (seed, index).
    ``wide_share``: the share of poses from the wider distribution (:func:`sample_pose`)."""
    rng = np.random.default_rng([int(seed), int(index)])
    iid = str(ID_BASE + int(index))
    S = int(render_size)
    label = _sample_label(rng, distractor_frac)
    if label in _ONE_CHARACTER:
        d = _one_character(rng, label, S, wide_share)
    elif label == "multiple":
        d = _several_characters(rng, S, wide_share)
    elif label == "scenery":
        d = _scenery_drawing(rng, S)
    else:
        d = _comic_drawing(rng, S, wide_share)
    general, tags_dropped = _noisy_tags(rng, label, d)
    rating = "e" if label == "rating" else _choice(rng, ["g", "s", "q"], [0.55, 0.4, 0.05])
    # Lanczos after a box pre-reduction (reducing_gap): antialiased and ~3x cheaper than plain Lanczos.
    image = d.img.convert("RGB")
    if image_size != S:
        image = image.resize((image_size, image_size), Image.LANCZOS, reducing_gap=2.0)
    meta = _meta(iid, general, rating, image_size, rng, d.meta_tags)
    lab = {"id": iid, "label": label, "suitable": label == "suitable", "caption": d.caption,
           "attributes": d.attrs, "pose_kind": d.kind, "revealing_tags_dropped": tags_dropped,
           "true_pose": None if d.true is None else [[round(float(x), 5), round(float(y), 5), int(v)]
                                                     for (x, y, v) in d.true.to_array()]}
    return {"image": image, "est_pose": d.est, "meta": meta, "label": lab}


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
@dataclass(frozen=True)
class SynthSettings:
    """What a synthetic dataset is: ``n`` candidates of ``image_size`` pixels, drawn at ``render_size`` from
    ``seed``; ``distractor_frac`` of them distractors; ``wide_share`` of the characters' poses from the wider
    distribution (:func:`sample_pose`). The same settings give the same bytes."""
    n: int
    image_size: int = 64
    render_size: int = 256
    seed: int = 0
    distractor_frac: float = 0.4
    wide_share: float = WIDE_SHARE

    def __post_init__(self) -> None:
        if self.n < 0 or self.image_size < 1 or self.render_size < 1:
            raise ValueError(f"n, image_size and render_size must be positive (got {self.n}, {self.image_size}, "
                             f"{self.render_size})")
        if not 0.0 <= self.distractor_frac <= 1.0:
            raise ValueError(f"distractor_frac must be in [0, 1], got {self.distractor_frac}")
        if not 0.0 <= self.wide_share <= 1.0:
            raise ValueError(f"wide_share must be in [0, 1], got {self.wide_share}")

    def record(self) -> dict[str, Any]:
        """The settings as ``dataset.json`` holds them, with the generator's version and constants."""
        return {"generator": "kpnb.synth", "version": SYNTH_VERSION, "n": int(self.n), "seed": int(self.seed),
                "image_size": int(self.image_size), "render_size": int(self.render_size),
                "distractor_frac": float(self.distractor_frac), "wide_share": float(self.wide_share),
                "distractor_shares": DISTRACTOR_SHARES,
                "tag_noise": TAG_NOISE, "keypoint_jitter": KEYPOINT_JITTER, "id_base": ID_BASE}


def _work(job: tuple[int, SynthSettings, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    index, s, out = job
    c = make_candidate(index, s.seed, s.image_size, s.render_size, s.distractor_frac, s.wide_share)
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


def _draw_all(jobs: list[tuple[int, SynthSettings, str]], workers: int, progress: bool
              ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(meta, label) of each job, in order, drawn by ``workers`` processes (or here when 0 or 1)."""
    n = len(jobs)
    bar = kprogress.bar(total=n, desc="synthetic dataset", disable=not progress, mininterval=1.0, unit_label="image")
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
    return results


def write_dataset(out_dir: str | Path, n: int, *, workers: int = 2, progress: bool = True,
                  **settings: Any) -> dict[str, Any]:
    """Write ``n`` candidates into ``out_dir`` (release layout + metadata.jsonl + labels.jsonl + dataset.json);
    ``settings``: the other fields of :class:`SynthSettings` by keyword (``image_size``, ``render_size``,
    ``seed``, ``distractor_frac``, ``wide_share``), their defaults where not given.

    ``dataset.json`` is written last, so it marks a finished dataset: when it holds the same settings and every
    file is there, nothing is redone. ``workers`` processes draw in parallel (identical output for any count).
    Returns a summary: counts per label, seconds, images/s, and whether the work was skipped."""
    s = SynthSettings(n, **settings)
    out = Path(out_dir)
    record = s.record()
    if _complete(out, record):
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
    results = _draw_all([(i, s, str(out)) for i in range(n)], workers, progress)
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
    (out / "dataset.json").write_text(json.dumps({"settings": record, "summary": summary}, indent=1))
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
        s = write_dataset(a.out, a.n, image_size=a.size, render_size=render, seed=a.seed,
                          distractor_frac=a.distractor_frac, workers=a.workers, progress=a.progress)
    except ValueError as e:
        print(f"kpnb synth: {e}")
        return 2
    verb = "already there (same settings), nothing to do" if s["skipped"] else f"written in {s['seconds']} s"
    print(f"kpnb synth: {s['n']} candidates in {s['out_dir']}: {verb}")
    print("  labels: " + ", ".join(f"{k} {v}" for k, v in s["counts"].items()))
    return 0
