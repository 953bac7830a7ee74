"""Datasets over the release layout, Danbooru metadata, splits, the packed subset, flip augmentation.

A dataset folder (the synthetic one from :mod:`kpnb.synth`, or the real Danbooru2021 images plus the
pose-keypoint release) looks like::

    images/<id>.<ext>      any PIL-readable image
    keypoints/<id>.json    release format ({"nose": [y, x], ...} in a 512 frame)
    metadata.jsonl         optional: Danbooru2021 metadata, one JSON object per line
    labels.jsonl           synthetic only: ground truth (label, suitable, caption, attributes, true_pose)

Nothing here dies on one bad file: unreadable/corrupt/truncated images, invalid keypoint files and images
without keypoints are counted and reported by file (:class:`Problems`), then skipped.

After filtering, notebook 01 packs the kept images into ``<run>/subset/{train,val}.npz`` (no pickles:
``allow_pickle=False``), which every later notebook reads with :func:`load_subset`.

The real-pose evaluation set (``data/real_poses/coco_persons.json``: COCO person keypoints, no images) is
built by :func:`build_real_pose_set` and read by :func:`real_pose_set`.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageFile

from kpnb.core import progress as kprogress
from kpnb.poses.formats import read_release_json
from kpnb.poses.pose import Pose, PoseError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


class DataError(ValueError):
    """A dataset folder or file that cannot be used at all (names the path)."""


@dataclass
class Problems:
    """Files skipped while loading, by kind, each with the file and the reason."""

    bad_images: list[tuple[str, str]] = field(default_factory=list)
    bad_keypoints: list[tuple[str, str]] = field(default_factory=list)
    no_keypoints: list[str] = field(default_factory=list)
    no_image: list[str] = field(default_factory=list)
    bad_metadata_lines: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.__dict__.items()}

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def summary(self, limit: int = 5) -> str:
        lines = []
        for k, v in self.__dict__.items():
            if v:
                shown = "; ".join(x if isinstance(x, str) else f"{x[0]} ({x[1]})" for x in v[:limit])
                more = f" ... and {len(v) - limit} more" if len(v) > limit else ""
                lines.append(f"{k}: {len(v)} - {shown}{more}")
        return "\n".join(lines) or "no problems"


# ---- images -------------------------------------------------------------------------------------------
def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """RGB uint8 [H, W, 3], resized (antialiased) to ``size`` x ``size`` when given. Raises DataError naming
    the file for anything unreadable, truncated or corrupt."""

    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey half-image
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = _square(im).resize((size, size), Image.LANCZOS)
            return np.asarray(im, dtype=np.uint8).copy()
    except Exception as e:  # noqa: BLE001 - PIL raises many types; all mean "cannot use this file"
        raise DataError(f"{path}: cannot read image ({e.__class__.__name__}: {e})") from e


def _square(im: Any) -> Any:
    """Pad to a square on the bottom/right, as the release's 512 frame does (keeps keypoint coordinates)."""

    w, h = im.size
    if w == h:
        return im
    s = max(w, h)
    out = Image.new("RGB", (s, s), (255, 255, 255))
    out.paste(im, (0, 0))
    return out


# ---- metadata -----------------------------------------------------------------------------------------
def tag_names(rec: dict[str, Any]) -> list[str]:
    """Tags of a Danbooru record: the 2020/2021 dump's ``tags`` list of {name, category}, or the API's
    ``tag_string`` (space separated)."""
    tags = rec.get("tags")
    if isinstance(tags, list):
        return [t["name"] if isinstance(t, dict) else str(t) for t in tags]
    ts = rec.get("tag_string")
    if isinstance(ts, str):
        return ts.split()
    return []


def read_metadata(path: str | Path, problems: Problems | None = None) -> dict[str, dict[str, Any]]:
    """Danbooru metadata (JSON lines) -> {id: record with normalised ``tag_names``, ``rating``, ``width``,
    ``height``}. Bad lines are reported in ``problems`` and skipped."""
    out: dict[str, dict[str, Any]] = {}
    path = Path(path)
    if not path.exists():
        return out
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
                rid = str(rec["id"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                if problems is not None:
                    problems.bad_metadata_lines.append((f"{path}:{n}", str(e)[:80]))
                continue
            rec["tag_names"] = tag_names(rec)
            rec["rating"] = str(rec.get("rating", "?"))
            out[rid] = rec
    return out


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# ---- candidates: everything a filter needs, in memory -------------------------------------------------
@dataclass
class Candidates:
    """The candidate pool: ids, images uint8 [N, S, S, 3], keypoint-file poses [N, 17, 3], metadata and
    (synthetic data only) ground-truth labels, plus the files that were skipped."""

    root: Path
    ids: list[str]
    images: np.ndarray
    poses: np.ndarray
    meta: list[dict[str, Any]]
    labels: list[dict[str, Any]] | None
    problems: Problems

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def suitable(self) -> np.ndarray | None:
        """Ground truth "suitable" per candidate (synthetic data), else None."""
        if self.labels is None:
            return None
        return np.array([bool(l.get("suitable")) for l in self.labels])

    def pose(self, i: int) -> Pose:
        return Pose.from_array(self.poses[i])


def _index_files(folder: Path, exts: Iterable[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if folder.is_dir():
        for p in folder.iterdir():
            if p.suffix.lower() in exts:
                out[p.stem] = p
    return out


def load_candidates(root: str | Path, size: int, limit: int | None = None, progress: bool = True) -> Candidates:
    """Load every usable (image, keypoints) pair of a dataset folder, images resized to ``size``.

    Skipped and reported: images without a keypoint file, keypoint files without an image, unreadable or
    invalid keypoint files, corrupt or truncated images, bad metadata lines.
    """

    root = Path(root)
    if not (root / "images").is_dir() or not (root / "keypoints").is_dir():
        raise DataError(f"{root}: not a dataset folder (needs images/ and keypoints/; see README 'Real data')")
    problems = Problems()
    images = _index_files(root / "images", IMAGE_EXTS)
    kps = _index_files(root / "keypoints", (".json",))
    problems.no_keypoints = sorted(str(images[i]) for i in set(images) - set(kps))
    problems.no_image = sorted(str(kps[i]) for i in set(kps) - set(images))
    ids = sorted(set(images) & set(kps), key=lambda s: (len(s), s))
    if limit is not None:
        ids = ids[:limit]
    meta_all = read_metadata(root / "metadata.jsonl", problems)
    labels_all = {str(r["id"]): r for r in read_jsonl(root / "labels.jsonl")}

    keep_ids, ims, poses = [], [], []
    for i in kprogress.bar(ids, desc="loading candidates", disable=not progress, mininterval=1.0, unit_label="image"):
        try:
            pose = read_release_json(kps[i])
        except PoseError as e:
            problems.bad_keypoints.append((str(kps[i]), str(e).split(": ", 1)[-1][:120]))
            continue
        try:
            im = load_image(images[i], size)
        except DataError as e:
            problems.bad_images.append((str(images[i]), str(e).split(": ", 1)[-1][:120]))
            continue
        keep_ids.append(i)
        ims.append(im)
        poses.append(pose.to_array())
    n = len(keep_ids)
    return Candidates(
        root=root, ids=keep_ids,
        images=np.stack(ims) if n else np.zeros((0, size, size, 3), np.uint8),
        poses=np.stack(poses) if n else np.zeros((0, 17, 3), np.float32),
        meta=[meta_all.get(i, {"id": i, "tag_names": [], "rating": "?"}) for i in keep_ids],
        labels=[labels_all.get(i, {}) for i in keep_ids] if labels_all else None,
        problems=problems,
    )


# ---- splits and the packed subset ---------------------------------------------------------------------
def split_of(image_id: str, val_frac: float, seed: int = 0) -> str:
    """'train' or 'val' from a hash of the id: stable when the pool grows or is reordered."""
    h = hashlib.sha1(f"{seed}:{image_id}".encode()).digest()
    return "val" if int.from_bytes(h[:8], "little") / 2**64 < val_frac else "train"


# ---- augmentation -------------------------------------------------------------------------------------
def flip_images(images: Any) -> Any:
    """Mirror images: numpy [N, H, W, C] on axis 2, torch [N, C, H, W] on the last axis."""
    if isinstance(images, np.ndarray):
        return images[:, :, ::-1].copy()
    return images.flip(-1)
