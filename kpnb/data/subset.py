"""The kept subset: saved as ``.npz`` or as memory-mapped ``subset/{train,val}.npy`` and read back without loading it."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from kpnb.core import progress as kprogress
from kpnb.core.files import atomic_path, atomic_write_bytes, write_json
from kpnb.data import shards as kshards
from kpnb.data.folder import DataError
from kpnb.data.shard_io import FILTER


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
    ``subset/<split>.npy`` that :func:`kpnb.run.filter.write_run_subset` writes for pools too big to hold:
    then ``images`` is a read-only memmap, read from disk as it is indexed."""
    path = Path(run_dir) / "subset" / f"{split}.npz"
    if not path.exists():
        mm = path.with_suffix(".npy")
        if mm.exists():
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


# ---- the kept subset as a memmap -------------------------------------------------------------------------------
def _sidecars(out_path: Path) -> tuple[Path, Path]:
    stem = out_path.name[:-4] if out_path.name.endswith(".npy") else out_path.name
    return out_path.with_name(f"{stem}.poses.npy"), out_path.with_name(f"{stem}.ids.json")


def write_subset_memmap(shard_dir: str | Path, kept: Mapping[str, Any] | str | Path | Sequence[str],
                        out_path: str | Path, size: int | None = None, *, progress: bool = False) -> dict[str, Any]:
    """Write the kept images to ``out_path`` (``.npy``, uint8 [N, S, S, 3]: the header by ``open_memmap``, rows by
    positioned writes)
    in the kept order, reading one shard at a time, with sidecars ``<stem>.poses.npy`` (float32 [N, 17, 3]) and
    ``<stem>.ids.json`` (``ids`` and each sample's ``meta``, whose ``labels`` hold captions and attributes).

    ``kept``: :func:`merge`'s index, the path of a ``kept.json``, or a list of ids (then every shard is read).
    ``size``: image size; None keeps the shards' size, another is resized from the shard image (LANCZOS), which
    is not the same as packing at that size. Every file goes to a temporary name and is renamed at the end,
    the images file last. Returns the paths and the count."""
    shard_dir, out_path = Path(shard_dir), Path(out_path)
    if isinstance(kept, (str, Path)):
        kept = json.loads(Path(kept).read_text())
    if isinstance(kept, Mapping):
        ids, shard_of = list(kept["kept_ids"]), list(kept["kept_shard"])
    else:
        ids, shard_of = list(kept), None
    position = {k: i for i, k in enumerate(ids)}
    if len(position) != len(ids):
        raise ValueError(f"{out_path}: the kept ids repeat an id")
    manifest = kshards.read_manifest(shard_dir)
    src_size = int(manifest["size"])
    size = src_size if size is None else int(size)
    wanted_shards = sorted(set(shard_of)) if shard_of is not None else list(range(manifest["n_shards"]))
    poses_path, ids_path = _sidecars(out_path)
    # the images file is renamed last (the outer block ends last): its presence means the sidecars are there
    with atomic_path(out_path, out_path.with_name(f".{out_path.name}.tmp")) as tmp_images, \
            atomic_path(poses_path, poses_path.with_name(f".{poses_path.name}.tmp")) as tmp_poses:
        # the header by open_memmap, the image rows by positioned writes: the rows pass through the page cache
        # instead of staying mapped (mapped pages count in this process's memory, growing with the subset)
        offset = np.lib.format.open_memmap(tmp_images, mode="w+", dtype=np.uint8,
                                           shape=(len(ids), size, size, 3)).offset
        row_bytes = size * size * 3
        poses = np.lib.format.open_memmap(tmp_poses, mode="w+", dtype=np.float32, shape=(len(ids), 17, 3))
        metas: list[Any] = [None] * len(ids)
        fd = os.open(tmp_images, os.O_WRONLY)
        try:
            for s in kprogress.bar(wanted_shards, desc="writing kept images", disable=not progress,
                                   unit_label="shard"):
                for key, im, pose, meta in kshards.iter_shards(shard_dir, [s]):
                    j = position.get(key)
                    if j is None:
                        continue
                    if size != src_size:
                        im = np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS), dtype=np.uint8)
                    os.pwrite(fd, np.ascontiguousarray(im, dtype=np.uint8).tobytes(), offset + j * row_bytes)
                    poses[j], metas[j] = pose, meta
        finally:
            os.close(fd)
        poses.flush()
        del poses  # close the map before the rename
        missing = [k for k, m in zip(ids, metas) if m is None]
        if missing:
            raise DataError(f"{shard_dir}: {len(missing)} kept ids not found in the shards "
                            f"(first: {', '.join(missing[:5])})")
        write_json(ids_path, {"format": FILTER.format, "n": len(ids), "size": size, "shard_dir": str(shard_dir),
                              "ids": ids, "meta": metas})
    return {"images": out_path, "poses": poses_path, "ids": ids_path, "n": len(ids), "size": size}


def load_subset_memmap(out_path: str | Path) -> dict[str, Any]:
    """What :func:`write_subset_memmap` wrote: ``images`` (read-only memmap), ``poses``, ``ids``, ``meta``."""
    out_path = Path(out_path)
    poses_path, ids_path = _sidecars(out_path)
    try:
        images = np.load(out_path, mmap_mode="r")
        poses = np.load(poses_path)
        side = json.loads(ids_path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{out_path}: cannot read the subset memmap or its sidecars ({e})") from e
    if not (len(images) == len(poses) == len(side["ids"]) == side["n"]):
        raise DataError(f"{out_path}: {len(images)} images, {len(poses)} poses, {len(side['ids'])} ids "
                        "(written by different runs?)")
    return {"images": images, "poses": poses, "ids": side["ids"], "meta": side["meta"]}
