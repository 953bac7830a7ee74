"""Candidate sources at Danbooru scale, read in place: kpnb's own dataset folder, or Danbooru2021 as it ships
beside the pose-keypoint release. Nothing is copied and nothing is decoded here.

Layouts (:func:`open_source` tells them apart)::

    kpnb           images/<id>.<ext>, keypoints/<id>.json, metadata.jsonl, labels.jsonl (synthetic only)
    danbooru2021   512px/<bucket>/<id>.jpg and/or original/<bucket>/<id>.<ext>, metadata/posts*.json,
                   bucket = f"{id % 1000:04d}"; SRC may also be the 512px/ (or original/) folder itself

The keypoint release is a folder of ``<id>.json`` files, flat or bucketed (``<bucket>/<id>.json``, the same
buckets). It is the small side (363k files against 4.9M images), so candidate ids come from listing it; an
image path is derived from the id and checked with a stat or two, never found by listing the image folders.
For the same reason images without a keypoint file are reported only in kpnb's own (small) layout: in
Danbooru2021 they are the normal case, not a problem.

Metadata (``posts*.json`` is tens of GB) is read as a stream, keeping only the posts whose ids have keypoints,
trimmed to what the filter uses (:func:`trim_meta`). Lines for other posts are skipped before JSON parsing
when their ``"id"`` fields show they are not wanted, so a bad line is reported only if it could have been a
wanted post. Missing pieces are listed in :class:`kpnb.data.folder.Problems`, never fatal: keypoint files without an
image here (``no_image``), a bad metadata line (``bad_metadata_lines``), a keypoint file whose id cannot be a
Danbooru post or sits in the wrong bucket (``bad_keypoints``). Decoding the keypoint file and the image is the
packer's work (:mod:`kpnb.data.shards`), which lists those failures the same way.
"""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from kpnb.data.folder import IMAGE_EXTS, DataError, Problems, tag_names

_BUCKET = re.compile(r"^\d{4}$")
_ID_FIELD = re.compile(rb'"id"\s*:\s*"?(\d+)')


def bucket(image_id: str) -> str:
    """Danbooru2021's folder of a post id: the id modulo 1000, four digits."""
    return f"{int(image_id) % 1000:04d}"


def id_key(image_id: str) -> tuple[int, int, str]:
    """Sort key: numeric ids in numeric order, then any others by length and text."""
    return (0, int(image_id), "") if image_id.isdigit() else (1, len(image_id), image_id)


@dataclass(frozen=True)
class Record:
    """One candidate: an id with an existing image and keypoint file, and its trimmed metadata."""

    id: str
    image_path: Path
    keypoint_path: Path
    meta: dict[str, Any]


@dataclass
class Source:
    """Where the images, keypoint files and metadata of a candidate pool are; see the module docstring.

    ``image_roots`` are searched in order as (folder, kind): kind ``flat`` (kpnb's images/), ``512px``
    (``<bucket>/<id>.jpg``) or ``original`` (``<bucket>/<id>.<file_ext>``)."""

    layout: str
    root: Path
    image_roots: list[tuple[Path, str]]
    keypoint_root: Path
    keypoints_bucketed: bool
    metadata_files: list[Path] = field(default_factory=list)
    labels_file: Path | None = None

    def describe(self) -> dict[str, Any]:
        """The paths and layout, as recorded in a shard manifest (absolute paths)."""
        return {"layout": self.layout, "root": str(self.root.resolve()),
                "image_roots": [[str(p.resolve()), kind] for p, kind in self.image_roots],
                "keypoints": str(self.keypoint_root.resolve()), "keypoints_bucketed": self.keypoints_bucketed,
                "metadata": [str(p.resolve()) for p in self.metadata_files],
                "labels": str(self.labels_file.resolve()) if self.labels_file else None}

    # ---- ids and paths --------------------------------------------------------------------------------
    def keypoint_ids(self, problems: Problems) -> list[str]:
        """Ids of the keypoint files, sorted by :func:`id_key`. One listing of the keypoint folder (or of each
        bucket); files in a bucket that does not match their id are reported and left out."""
        ids: list[str] = []
        if not self.keypoints_bucketed:
            with os.scandir(self.keypoint_root) as it:
                ids = [e.name[:-5] for e in it if e.name.endswith(".json") and e.is_file()]
        else:
            with os.scandir(self.keypoint_root) as it:
                buckets = sorted(e.name for e in it if e.is_dir() and _BUCKET.match(e.name))
            for b in buckets:
                with os.scandir(self.keypoint_root / b) as it:
                    for e in it:
                        if not e.name.endswith(".json"):
                            continue
                        i = e.name[:-5]
                        if not i.isdigit() or bucket(i) != b:
                            problems.bad_keypoints.append(
                                (str(self.keypoint_root / b / e.name), f"in bucket {b}, which is not the "
                                 f"bucket of id {i!r}" if i.isdigit() else "file name is not a post id"))
                            continue
                        ids.append(i)
        if self.layout == "danbooru2021":
            bad = [i for i in ids if not i.isdigit()]
            for i in bad:
                problems.bad_keypoints.append((str(self.keypoint_path(i)), "file name is not a Danbooru post id"))
            ids = [i for i in ids if i.isdigit()]
        return sorted(ids, key=id_key)

    def keypoint_path(self, image_id: str) -> Path:
        if self.keypoints_bucketed:
            return self.keypoint_root / bucket(image_id) / f"{image_id}.json"
        return self.keypoint_root / f"{image_id}.json"

    def image_path(self, image_id: str, meta: dict[str, Any] | None = None) -> Path | None:
        """The first existing image of an id, or None; a few stats, no listing."""
        for folder, kind in self.image_roots:
            if kind == "flat":
                names = [f"{image_id}{e}" for e in IMAGE_EXTS]
                sub = folder
            else:
                sub = folder / bucket(image_id)
                ext = (meta or {}).get("file_ext")
                if kind == "512px":
                    names = [f"{image_id}.jpg"]
                elif ext:
                    names = [f"{image_id}.{ext}"]
                else:
                    names = [f"{image_id}{e}" for e in IMAGE_EXTS]
            for n in names:
                p = sub / n
                if p.is_file():
                    return p
        return None

    def orphan_images(self, ids: Iterable[str], problems: Problems) -> None:
        """kpnb layout only: list the images without a keypoint file in ``problems.no_keypoints`` (as
        :func:`kpnb.data.folder.load_candidates` does). Not done for Danbooru2021: it would list 4.9M files."""
        if self.layout != "kpnb":
            return
        have = set(ids)
        for folder, _ in self.image_roots:
            with os.scandir(folder) as it:
                problems.no_keypoints.extend(sorted(
                    str(folder / e.name) for e in it if os.path.splitext(e.name)[1].lower() in IMAGE_EXTS
                    and os.path.splitext(e.name)[0] not in have))

    # ---- metadata ---------------------------------------------------------------------------------------
    def iter_meta(self, wanted: set[str], problems: Problems) -> Iterator[tuple[str, dict[str, Any]]]:
        """(id, trimmed record) for the wanted ids, streaming the metadata files; of repeats, the last wins."""
        return iter_posts(self.metadata_files, wanted, problems)

    def iter_labels(self, wanted: set[str]) -> Iterator[tuple[str, dict[str, Any]]]:
        """(id, synthetic ground truth) from labels.jsonl for the wanted ids; nothing without a labels file."""
        if self.labels_file is None or not self.labels_file.exists():
            return
        with open(self.labels_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    rid = str(rec["id"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise DataError(f"{self.labels_file}:{n}: bad labels line ({e})") from e
                if rid in wanted:
                    yield rid, rec

    # ---- candidates -------------------------------------------------------------------------------------
    def records(self, ids: Iterable[str], meta: dict[str, dict[str, Any]], problems: Problems) -> Iterator[Record]:
        """Candidate records of ``ids`` in order, lazily; an id without an image goes to ``problems.no_image``
        (its keypoint file named, as in :func:`kpnb.data.folder.load_candidates`). ``meta``: id -> :meth:`iter_meta`'s record;
        ids without metadata get an empty record."""
        for i in ids:
            m = meta.get(i) or empty_meta(i)
            img = self.image_path(i, m)
            if img is None:
                problems.no_image.append(str(self.keypoint_path(i)))
                continue
            yield Record(i, img, self.keypoint_path(i), m)


def empty_meta(image_id: str) -> dict[str, Any]:
    return {"id": image_id, "tag_names": [], "rating": "?", "width": None, "height": None}


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def trim_meta(rec: dict[str, Any]) -> dict[str, Any]:
    """The fields the filter uses, from a Danbooru2021 dump or API record: id, tag_names, rating, width,
    height, plus file_ext (where original/ images are found)."""
    out = {"id": str(rec["id"]), "tag_names": tag_names(rec), "rating": str(rec.get("rating", "?")),
           "width": _int_or_none(rec.get("image_width", rec.get("width"))),
           "height": _int_or_none(rec.get("image_height", rec.get("height")))}
    if rec.get("file_ext"):
        out["file_ext"] = str(rec["file_ext"])
    return out


def iter_posts(files: Iterable[Path], wanted: set[str], problems: Problems) -> Iterator[tuple[str, dict[str, Any]]]:
    """Stream Danbooru JSON-lines metadata files: (id, trimmed record) of the ``wanted`` ids, in file order.

    When every wanted id is numeric, a line whose ``"id"`` fields (the post's and its tags') name no wanted id
    is skipped unparsed: that is most of a 4.9M-line dump. Other lines are parsed; a bad one is listed in
    ``problems.bad_metadata_lines`` as ``file:line`` with the reason."""
    numeric = all(w.isdigit() for w in wanted)
    wanted_b = {w.encode() for w in wanted} if numeric else set()
    for path in files:
        with open(path, "rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if numeric:
                    found = _ID_FIELD.findall(line)
                    if found and not any(x in wanted_b for x in found):
                        continue
                try:
                    rec = json.loads(line)
                    rid = str(rec["id"])
                    if rid not in wanted:
                        continue
                    trimmed = trim_meta(rec)
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                    problems.bad_metadata_lines.append((f"{path}:{n}", f"{e.__class__.__name__}: {e}"[:80]))
                    continue
                yield rid, trimmed


# ---- layout detection -----------------------------------------------------------------------------------
def _has_buckets(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(e.is_dir() and _BUCKET.match(e.name) for e in it)


def _keypoints_bucketed(folder: Path) -> bool:
    """Flat (``<id>.json``) or bucketed (``<bucket>/<id>.json``); a folder mixing both is refused."""
    flat = bucketed = False
    with os.scandir(folder) as it:
        for e in it:
            if e.name.endswith(".json") and e.is_file():
                flat = True
            elif _BUCKET.match(e.name) and e.is_dir():
                bucketed = True
            if flat and bucketed:
                raise DataError(f"{folder}: keypoint folder mixes <id>.json files and <bucket>/ folders; "
                                f"use one layout")
    return bucketed


def open_source(src: str | Path, keypoints: str | Path | None = None,
                metadata: str | Iterable[str | Path] | None = None) -> Source:
    """Detect the layout of ``src`` (see the module docstring) and where its parts are.

    ``keypoints``: the keypoint release folder (default ``src/keypoints``). ``metadata``: a glob or a list of
    files (default ``src/metadata.jsonl`` for kpnb's layout, ``metadata/posts*.json`` beside or in a
    Danbooru2021 folder); a glob that matches nothing is refused, missing default metadata is not."""
    root = Path(src)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    kp = Path(keypoints) if keypoints is not None else root / "keypoints"
    if (root / "images").is_dir():
        layout, image_roots, meta_default = "kpnb", [(root / "images", "flat")], [root / "metadata.jsonl"]
    else:
        image_roots = [(root / k, k) for k in ("512px", "original") if (root / k).is_dir()]
        meta_dir = root / "metadata"
        if not image_roots and _has_buckets(root):  # src is 512px/ or original/ itself
            image_roots = [(root, "original" if root.name == "original" else "512px")]
            meta_dir = root.parent / "metadata"
        if not image_roots:
            raise DataError(f"{root}: neither kpnb's layout (images/, keypoints/) nor Danbooru2021's (512px/ or "
                            f"original/ with <bucket>/<id>.<ext>, or such bucket folders here)")
        layout, meta_default = "danbooru2021", sorted(meta_dir.glob("posts*.json"))
    if not kp.is_dir():
        hint = "" if keypoints is not None else " (pass the keypoint release folder with --keypoints)"
        raise DataError(f"{kp}: no keypoint folder{hint}")
    if metadata is None:
        files = [p for p in meta_default if p.is_file()]
    elif isinstance(metadata, (str, Path)):
        files = [Path(p) for p in sorted(glob.glob(str(metadata)))]
        if not files:
            raise DataError(f"{metadata}: no metadata file matches")
    else:
        files = [Path(p) for p in metadata]
        for p in files:
            if not p.is_file():
                raise DataError(f"{p}: no such metadata file")
    labels = root / "labels.jsonl" if layout == "kpnb" and (root / "labels.jsonl").is_file() else None
    return Source(layout=layout, root=root, image_roots=image_roots, keypoint_root=kp,
                  keypoints_bucketed=_keypoints_bucketed(kp), metadata_files=files, labels_file=labels)
