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
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageFile

from . import progress as kprogress
from .keypoints import Pose, PoseError, coco_person_problem, read_pose_dir, read_release_json
from .runs import atomic_write_bytes, repo_root

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
def _tag_names(rec: dict[str, Any]) -> list[str]:
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
            rec["tag_names"] = _tag_names(rec)
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


def save_subset(run_dir: str | Path, split: str, *, ids: list[str], images: np.ndarray, poses: np.ndarray,
                captions: list[str], attrs: list[dict[str, Any]]) -> Path:
    """Write ``<run>/subset/<split>.npz`` (no object arrays, so it loads without pickle)."""

    buf = io.BytesIO()
    np.savez(buf, ids=np.array(ids, dtype=str), images=images.astype(np.uint8), poses=poses.astype(np.float32),
             captions=np.array(captions, dtype=str), attrs_json=np.array([json.dumps(a) for a in attrs], dtype=str))
    path = Path(run_dir) / "subset" / f"{split}.npz"
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_subset(run_dir: str | Path, split: str = "train") -> dict[str, Any]:
    """The packed subset of a run: ``ids``, ``images`` uint8 [N,S,S,3], ``poses`` [N,17,3], ``captions``,
    ``attrs`` (list of dicts). From ``subset/<split>.npz`` (notebook 01), else from the memory-mapped
    ``subset/<split>.npy`` that :func:`kpnb.stream_filter.write_run_subset` writes for pools too big to hold:
    then ``images`` is a read-only memmap, read from disk as it is indexed."""
    path = Path(run_dir) / "subset" / f"{split}.npz"
    if not path.exists():
        mm = path.with_suffix(".npy")
        if mm.exists():
            from .stream_filter import load_subset_memmap

            got = load_subset_memmap(mm)
            labels = [(m or {}).get("labels") or {} for m in got["meta"]]
            return {"ids": np.array(got["ids"], dtype=str), "images": got["images"], "poses": got["poses"],
                    "captions": np.array([lab.get("caption", "") for lab in labels], dtype=str),
                    "attrs": [lab.get("attributes", {}) for lab in labels]}
        raise DataError(f"{path}: no subset yet - run notebook 01_dataset_filtering first")
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out["attrs"] = [json.loads(s) for s in out.pop("attrs_json")]
    return out


# ---- augmentation -------------------------------------------------------------------------------------
def flip_images(images: Any) -> Any:
    """Mirror images: numpy [N, H, W, C] on axis 2, torch [N, C, H, W] on the last axis."""
    if isinstance(images, np.ndarray):
        return images[:, :, ::-1].copy()
    return images.flip(-1)


# ---- the real-pose evaluation set ---------------------------------------------------------------------
REAL_POSES = Path("data") / "real_poses" / "coco_persons.json"  # relative to the repository root
REAL_POSE_INFO = {
    "description": "kpnb's real-pose evaluation set: the persons of COCO 2017 person-keypoint annotations "
                   "(train2017 and val2017) usable as a pose condition (kpnb.keypoints.coco_person_problem); "
                   "annotations only, no images",
    "source": "the subset of person_keypoints_{train,val}2017.json in https://github.com/Obmutescence/COCO-MINI "
              "(annotations/, commit a527a210ea7862caa41e35ac76851a6e42c531ad), taken from COCO 2017",
    "url": "https://cocodataset.org",
    "contributor": "COCO Consortium",
    "year": 2017,
    "licence": "the annotations: Creative Commons Attribution 4.0 (CC BY 4.0), (c) COCO Consortium; the images "
               "(not included, only named) keep their own Flickr licences",
}
REAL_POSE_LICENSES = [{"id": 1, "name": "Creative Commons Attribution 4.0 International (the annotations)",
                       "url": "https://creativecommons.org/licenses/by/4.0/"}]
_IMAGE_FIELDS = ("id", "width", "height", "file_name", "coco_url")
_ANN_FIELDS = ("id", "image_id", "keypoints", "num_keypoints", "bbox", "category_id", "iscrowd", "area")


def build_real_pose_set(sources: Iterable[str | Path], out: str | Path | None = None, *, min_joints: int = 8,
                        min_height: float = 64.0) -> dict[str, Any]:
    """The real-pose evaluation set from COCO person-keypoint files (``sources``, in order): every annotation
    :func:`kpnb.keypoints.coco_person_problem` accepts (``min_joints``, ``min_height``), with its fields
    ``id, image_id, keypoints, num_keypoints, bbox, category_id, iscrowd, area`` (no segmentation), and the
    images they are on with ``id, width, height, file_name, coco_url`` only; ``info`` carries the source,
    the attribution and the rule. Written to ``out`` (None: :data:`REAL_POSES` in the repository) as JSON,
    and returned with ``info["counts"]`` = {source file name: [persons, usable]}."""
    images: dict[Any, dict[str, Any]] = {}
    anns: list[dict[str, Any]] = []
    counts = {}
    for src in sources:
        obj = json.loads(Path(src).read_text())
        by_id = {im["id"]: im for im in obj["images"]}
        persons = [a for a in obj["annotations"] if a.get("category_id", 1) == 1]
        usable = [a for a in persons if coco_person_problem(a, min_joints, min_height) is None]
        counts[Path(src).name] = [len(persons), len(usable)]
        for a in usable:
            anns.append({k: a[k] for k in _ANN_FIELDS})
            images.setdefault(a["image_id"], {k: by_id[a["image_id"]][k] for k in _IMAGE_FIELDS})
    info = {**REAL_POSE_INFO, "rule": {"min_joints": min_joints, "min_height": min_height,
                                       "also": "not a crowd; both shoulders and a hip labelled"},
            "counts": counts}
    coco = {"info": info, "licenses": REAL_POSE_LICENSES, "images": list(images.values()), "annotations": anns,
            "categories": [{"id": 1, "name": "person", "supercategory": "person",
                            "keypoints": ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                                          "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                                          "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
                                          "right_ankle"]}]}
    path = Path(out) if out is not None else repo_root() / REAL_POSES
    path.parent.mkdir(parents=True, exist_ok=True)
    # one image or annotation a line, so that a change to the set reads as a diff
    parts = [f'"{k}": [\n' + ",\n".join(json.dumps(x) for x in v) + "\n]" if isinstance(v, list) and k != "licenses"
             else f'"{k}": {json.dumps(v)}' for k, v in coco.items()]
    atomic_write_bytes(path, ("{\n" + ",\n".join(parts) + "\n}\n").encode())
    return coco


def real_pose_set(path: str | Path | None = None) -> tuple[list[str], list[Pose]]:
    """The real-pose evaluation set (None: :data:`REAL_POSES` in the repository) as (labels, poses in the square
    frame): :func:`kpnb.keypoints.read_pose_dir` on the COCO file, so each person is placed by its bounding box
    (:func:`kpnb.keypoints.coco_to_frame`, margin 0.1: the box's longer side spans 80% of the frame, as a
    synthetic full-body character spans 50-93% of its height), labels ``<file stem>-coco<image id>-<index>``.

    Joints keep COCO's labels: v=2 VISIBLE, v=1 HIDDEN, v=0 MISSING (coordinates 0), and a labelled joint the
    placement puts outside the frame OUTSIDE. What each consumer makes of them:
    :func:`kpnb.pose_estimator.pck` scores only VISIBLE joints (MISSING, HIDDEN and OUTSIDE ones never count;
    the scale is the box of the VISIBLE and HIDDEN joints), :func:`kpnb.pose_estimator.pose_ap` scores VISIBLE
    and HIDDEN ones (COCO's own v=2 and v=1); conditioning (:mod:`kpnb.conditioning`) gives a MISSING joint
    no heatmap and no limb to it in ``skeleton`` mode, the learned "missing" token without coordinates in
    ``tokens`` mode, and the cell (0, 0) in the faithful ``grid`` mode (the original had no missing joints)."""
    return read_pose_dir(path if path is not None else repo_root() / REAL_POSES)
