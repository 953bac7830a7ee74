"""WebDataset tar shards of a candidate pool: ``kpnb data pack`` writes them, :func:`iter_shards` reads them.

``kpnb data pack SRC --out DIR [--size 256] [--shard-size 1000] [--workers N] [--keypoints KP_DIR]
[--metadata GLOB] [--limit N] [--format png|jpg]`` reads a source in kpnb's or Danbooru2021's layout
(:mod:`kpnb.data.danbooru`) and writes into DIR (names and done-records: :data:`kpnb.data.shard_io.PACK`)::

    shard-000000.tar    samples <id>.png (the image through data.load_image(path, size)), <id>.pose.json
                        (the keypoint file as kpnb's Pose array, [17][x, y, visibility]), <id>.meta.json
                        (tag_names, rating, width, height; synthetic data: its labels.jsonl record as "labels")
    shard-000000.json   the shard's done-record: ids planned, keys written, sample count, bytes, sha1, problems
    manifest.json       source paths, settings, every shard with count and sha1, all problems

Shard i holds the keypoint ids [i*shard_size, (i+1)*shard_size) of the sorted id list (numeric order for
Danbooru ids). An id whose image is missing or unreadable, or whose keypoint file is invalid, is left out and
listed among that shard's problems, so a shard may hold fewer samples; the shard of an id never depends on
other files failing, which is what lets a rerun keep finished shards.

Resumable and atomic: a shard is written to ``shard-N.tar.tmp``, fsynced and renamed, then its done-record is
written (atomically). A rerun skips every shard whose tar and record exist and agree with the settings and
the planned ids; a ``.tmp`` left by a killed pack is deleted. ``manifest.json`` is rebuilt from the records
at the end, so a killed pack loses at most the shards in flight. Two packs into one DIR at once are not
supported.

Choices:

* PNG, not JPEG, by default: lossless, so a shard's image equals ``data.load_image(path, size)`` exactly, and
  the synthetic line-art keeps its one-pixel lines without ringing. ``--format jpg`` (quality 95) makes real
  photo-like shards about 4x smaller.
* ``webdataset.TarWriter`` (the format's reference writer) with a fixed mtime, user and group, so a shard's
  bytes depend only on its contents: a resumed pack gives byte-identical shards and sha1s. Reading uses plain
  :mod:`tarfile`, to name the shard and member in every error and to check the sha1 before the first sample.
* Worker processes start with ``spawn``: a forked child inherits the parent's threads' locks (tqdm's monitor,
  torch's or a notebook kernel's threads) and can deadlock; spawn is safe everywhere, and its start-up cost
  (importing numpy and PIL) is small beside a shard of 1000 images. The worker function lives in this module,
  so it also works from a notebook.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import shutil
import sys
import tarfile
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image

from kpnb.core import progress as kprogress
from kpnb.core.files import atomic_path, file_sha1, naming_full_disk, write_json
from kpnb.data.danbooru import Source, empty_meta, open_source
from kpnb.data.folder import DataError, Problems, load_image
from kpnb.data.shard_io import PACK, read_format_json
from kpnb.poses.formats import read_release_json
from kpnb.poses.pose import PoseError

FORMAT = PACK.format
MANIFEST = "manifest.json"
SPILL = ".meta-spill"  # per-shard metadata while a pack runs (_spill_meta); removed when it ends
DELAY_ENV = PACK.delay_env  # test hook: seconds to sleep per sample (makes a pack slow enough to kill)
TAR_MTIME = 0  # fixed tar header fields: shard bytes depend on the samples only
IMAGE_FORMATS = ("png", "jpg")


class ShardError(DataError):
    """A shard file that cannot be read as written (truncated, modified, corrupt): names the file."""


def shard_name(index: int) -> str:
    return PACK.name(index)


def _ids_sha1(ids: list[str]) -> str:
    return hashlib.sha1("\n".join(ids).encode()).hexdigest()


def _problem_list(problems: Problems) -> list[dict[str, str]]:
    out = []
    for kind, items in problems.__dict__.items():
        for x in items:
            f, why = (x, {"no_image": "no image for this keypoint file",
                          "no_keypoints": "no keypoint file for this image"}.get(kind, "")) if isinstance(x, str) else x
            out.append({"kind": kind, "file": f, "reason": why})
    return out


def _encode(im: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        Image.fromarray(im).save(buf, format="PNG", compress_level=6)
    else:
        Image.fromarray(im).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


@dataclass
class _Job:
    index: int
    ids: list[str]
    meta_file: Path  # this shard's metadata (_spill_meta)
    source: Source
    out: Path
    settings: dict[str, Any]


def _pack_shard(job: _Job) -> dict[str, Any]:
    """Write one shard (tmp, fsync, rename) and then its done-record; returns the record."""
    from webdataset import TarWriter

    t0 = time.time()
    name = shard_name(job.index)
    size, fmt = job.settings["size"], job.settings["image_format"]
    delay = PACK.delay()
    problems = Problems()
    keys: list[str] = []
    final = job.out / f"{name}.tar"
    with atomic_path(final, job.out / f"{name}.tar.tmp") as tmp, open(tmp, "wb") as f:
        w = TarWriter(f, encoder=False, mtime=TAR_MTIME, user="kpnb", group="kpnb")
        for rec in job.source.records(job.ids, _read_spill(job.meta_file), problems):
            if delay:
                time.sleep(delay)
            if "." in rec.id:  # WebDataset splits a member name at the first dot into key and field
                problems.bad_keypoints.append((str(rec.keypoint_path), "id contains a dot: cannot be a shard key"))
                continue
            try:
                pose = read_release_json(rec.keypoint_path)
            except PoseError as e:
                problems.bad_keypoints.append((str(rec.keypoint_path), str(e).split(": ", 1)[-1][:160]))
                continue
            try:
                im = load_image(rec.image_path, size)
            except DataError as e:
                problems.bad_images.append((str(rec.image_path), str(e).split(": ", 1)[-1][:160]))
                continue
            meta = {k: v for k, v in rec.meta.items() if k != "file_ext"}
            w.write({"__key__": rec.id, fmt: _encode(im, fmt),
                     "pose.json": json.dumps(pose.to_array().tolist()).encode(),
                     "meta.json": json.dumps(meta, sort_keys=True).encode()})
            keys.append(rec.id)
        w.close()  # the end-of-archive blocks; f stays open (TarWriter closes only files it opened)
    record = {"name": name, "file": final.name, "index": job.index, "settings": job.settings,
              "ids_sha1": _ids_sha1(job.ids), "first_id": job.ids[0], "last_id": job.ids[-1],
              "n_planned": len(job.ids), "n": len(keys), "bytes": final.stat().st_size, "sha1": file_sha1(final),
              "keys": keys, "problems": _problem_list(problems), "seconds": round(time.time() - t0, 3)}
    write_json(job.out / f"{name}.json", record)
    return record


def _clean(out: Path, n_shards: int) -> list[str]:
    """Delete what a killed pack left (``.tmp`` files) and the shards of an earlier, larger pack."""
    gone = PACK.remove_temps(out)  # a done-record being written
    for p in sorted(out.glob("shard-*")):
        stem = p.name.split(".", 1)[0]
        idx = stem[len("shard-"):]
        if not idx.isdigit():
            continue
        if p.name.endswith(".tmp") or (int(idx) >= n_shards and p.suffix in (".tar", ".json")):
            p.unlink()
            gone.append(p.name)
    return gone


def pack(src: str | Path | Source, out: str | Path, *, size: int = 256, shard_size: int = 1000, workers: int = 2,
         limit: int | None = None, image_format: str = "png", progress: bool = True) -> dict[str, Any]:
    """Pack a source into WebDataset shards in ``out`` (see the module docstring); returns the manifest.
    Finished shards of an earlier pack with the same settings are kept. ``src``: a folder, its keypoints and
    metadata where :func:`kpnb.data.danbooru.open_source` looks by default, or the :class:`Source` that
    ``open_source(folder, keypoints, metadata)`` gives for other places."""
    if size < 1 or shard_size < 1:
        raise ValueError(f"size and shard_size must be positive (got {size}, {shard_size})")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    t0 = time.time()
    source = src if isinstance(src, Source) else open_source(src)
    out = Path(out)
    problems = Problems()  # source-level: keypoint folder, metadata, orphan images
    ids = source.keypoint_ids(problems)
    source.orphan_images(ids, problems)
    if limit is not None:
        ids = ids[:limit]
    settings = {"format": FORMAT, "size": size, "shard_size": shard_size, "image_format": image_format,
                "source": source.describe()}
    plan = [ids[k:k + shard_size] for k in range(0, len(ids), shard_size)]

    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # rebuilt below; never describes a pack in progress
    _clean(out, len(plan))
    records: dict[int, dict[str, Any]] = {}
    for i, chunk in enumerate(plan):
        rec = PACK.done_record(out, i, {"settings": settings, "ids_sha1": _ids_sha1(chunk)})
        if rec is not None:
            records[i] = rec
    todo = [i for i in range(len(plan)) if i not in records]
    no_meta = _spill_meta(source, plan, todo, out / SPILL, problems)
    jobs = (_Job(i, plan[i], out / SPILL / f"{i}.jsonl", source, out, settings) for i in todo)

    bar = kprogress.bar(total=len(plan), initial=len(records), desc="packing shards", disable=not progress,
                        unit_label="shard")
    t_run, n_run = time.time(), 0

    def done(rec: dict[str, Any]) -> None:
        nonlocal n_run
        records[rec["index"]] = rec
        n_run += rec["n_planned"]
        bar.set_postfix(images_per_s=f"{n_run / max(time.time() - t_run, 1e-6):.1f}", refresh=False)
        bar.update(1)

    try:
        if workers > 1 and len(todo) > 1:
            import multiprocessing as mp

            with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=mp.get_context("spawn")) as ex:
                running: set = set()
                for job in jobs:  # at most 2 shards per worker in flight: their metadata is all that is held
                    running.add(ex.submit(_pack_shard, job))
                    if len(running) >= 2 * workers:
                        finished, running = wait(running, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            done(fut.result())
                for fut in wait(running).done:
                    done(fut.result())
        else:
            for job in jobs:
                done(_pack_shard(job))
    finally:
        bar.close()

    shards = [records[i] for i in range(len(plan))]
    manifest = {
        "format": FORMAT, "source": source.describe(), "size": size, "shard_size": shard_size, "image_format": image_format, "limit": limit,
        "n_candidates": len(ids), "n_samples": sum(r["n"] for r in shards), "n_shards": len(shards),
        "n_no_metadata": no_meta,
        "shards": [{k: r[k] for k in ("file", "n", "n_planned", "bytes", "sha1", "first_id", "last_id", "problems")}
                   for r in shards],
        "source_problems": _problem_list(problems),
        "problem_counts": _counts(problems, shards),
        "seconds_this_run": round(time.time() - t0, 2), "shards_packed_this_run": len(todo),
    }
    write_json(out / MANIFEST, manifest)
    shutil.rmtree(out / SPILL, ignore_errors=True)
    return manifest


def _spill_meta(source: Source, plan: list[list[str]], todo: list[int], spill: Path, problems: Problems,
                flush_every: int = 20000) -> int:
    """Stream the source's metadata and labels once into ``spill/<shard>.jsonl`` (``[id, field, record]`` per
    line, in stream order) for the shards in ``todo``, so the pack never holds the whole pool's metadata: each
    shard's job reads only its own file. Returns how many ids of the whole plan have no metadata record."""
    shutil.rmtree(spill, ignore_errors=True)  # a killed pack's spill may be partial: written again
    spill.mkdir(parents=True)
    shard_of = {k: i for i, chunk in enumerate(plan) for k in chunk}
    wanted, keep = set(shard_of), set(todo)
    have_meta: set[str] = set()
    buffers: dict[int, list[str]] = {}
    held = 0

    def flush() -> None:
        nonlocal held
        for i, lines in buffers.items():
            with naming_full_disk(spill / f"{i}.jsonl"), open(spill / f"{i}.jsonl", "a", encoding="utf-8") as f:
                f.writelines(lines)
        buffers.clear()
        held = 0

    def put(rid: str, fld: str, rec: dict[str, Any]) -> None:
        nonlocal held
        i = shard_of[rid]
        if i in keep:
            buffers.setdefault(i, []).append(json.dumps([rid, fld, rec]) + "\n")
            held += 1
            if held >= flush_every:
                flush()

    for rid, rec in source.iter_meta(wanted, problems):
        have_meta.add(rid)
        put(rid, "meta", rec)
    for rid, lab in source.iter_labels(wanted):
        put(rid, "labels", lab)
    flush()
    return len(wanted) - len(have_meta) if source.metadata_files else len(wanted)


def _read_spill(path: Path) -> dict[str, dict[str, Any]]:
    """One shard's metadata from :func:`_spill_meta`'s file: id -> record, ``labels`` set from the labels."""
    meta: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return meta
    with open(path, encoding="utf-8") as f:
        for line in f:
            rid, fld, rec = json.loads(line)
            if fld == "meta":
                meta[rid] = {**rec, **({"labels": meta[rid]["labels"]} if "labels" in meta.get(rid, {}) else {})}
            else:
                meta.setdefault(rid, empty_meta(rid))["labels"] = rec
    return meta


def _counts(problems: Problems, shards: list[dict[str, Any]]) -> dict[str, int]:
    counts = problems.counts()
    for r in shards:
        for p in r["problems"]:
            counts[p["kind"]] = counts.get(p["kind"], 0) + 1
    return counts


# ---- reading ----------------------------------------------------------------------------------------------
def read_manifest(folder: str | Path) -> dict[str, Any]:
    return read_format_json(Path(folder) / MANIFEST, FORMAT, "no shard manifest; pack first with kpnb data pack")


def _samples(path: Path, fmt: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {field: bytes}) per sample of a tar, members of one key being consecutive (as written)."""
    key, parts = None, {}
    with tarfile.open(path, mode="r|") as tar:
        for m in tar:
            if not m.isfile():
                continue
            k, _, fld = m.name.partition(".")
            if k != key and key is not None:
                yield key, parts
                parts = {}
            key = k
            parts[fld] = tar.extractfile(m).read()
    if key is not None:
        yield key, parts


def _decode(path: Path, key: str, parts: dict[str, bytes], fmt: str) -> tuple[np.ndarray, np.ndarray, dict]:
    missing = [f for f in (fmt, "pose.json", "meta.json") if f not in parts]
    if missing:
        raise ShardError(f"{path}: sample {key!r} lacks {', '.join(missing)}")
    try:
        with Image.open(io.BytesIO(parts[fmt])) as im:
            image = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        pose = np.asarray(json.loads(parts["pose.json"]), dtype=np.float32)
        meta = json.loads(parts["meta.json"])
    except Exception as e:  # noqa: BLE001 - PIL/json: all mean a damaged sample
        raise ShardError(f"{path}: sample {key!r} cannot be decoded ({e.__class__.__name__}: {e})") from e
    if pose.shape != (17, 3):
        raise ShardError(f"{path}: sample {key!r} pose has shape {pose.shape}, expected (17, 3)")
    return image, pose, meta


def iter_shards(folder: str | Path, shards: Iterable[int | str] | None = None, *, skip_bad: bool = False,
                verify: bool = True, skipped: list[tuple[str, str]] | None = None
                ) -> Iterator[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]]:
    """Yield ``(key, image uint8 [S, S, 3], pose float32 [17, 3], meta)`` from a packed folder, in manifest
    order. ``shards``: indices or file names to read (default all).

    ``verify`` checks each shard's size and sha1 against the manifest before its first sample (one extra read
    of the file), so a truncated or modified shard yields nothing. A bad shard raises :class:`ShardError`
    naming the file; with ``skip_bad`` it is instead warned about, appended to ``skipped`` as (file, reason)
    and passed over. Without ``verify`` a damage found mid-shard comes after that shard's earlier samples."""
    folder = Path(folder)
    m = read_manifest(folder)
    fmt = m["image_format"]
    entries = m["shards"]
    if shards is not None:
        want = {s if isinstance(s, str) else entries[s]["file"] for s in shards}
        unknown = want - {e["file"] for e in entries}
        if unknown:
            raise DataError(f"{folder}: no shard(s) {', '.join(sorted(unknown))} in the manifest")
        entries = [e for e in entries if e["file"] in want]
    for e in entries:
        path = folder / e["file"]
        try:
            if verify:
                try:
                    nbytes = path.stat().st_size
                except OSError as ex:
                    raise ShardError(f"{path}: cannot read shard ({ex.__class__.__name__}: {ex})") from ex
                if nbytes != e["bytes"]:
                    raise ShardError(f"{path}: {nbytes} bytes, manifest says {e['bytes']} (truncated or rewritten)")
                if file_sha1(path) != e["sha1"]:
                    raise ShardError(f"{path}: sha1 differs from the manifest (corrupt or rewritten)")
            n = 0
            try:
                for key, parts in _samples(path, fmt):
                    image, pose, meta = _decode(path, key, parts, fmt)
                    n += 1
                    yield key, image, pose, meta
            except (tarfile.TarError, OSError, EOFError) as ex:
                raise ShardError(f"{path}: damaged tar after {n} samples ({ex.__class__.__name__}: {ex})") from ex
            if n != e["n"]:
                raise ShardError(f"{path}: {n} samples, manifest says {e['n']} (truncated?)")
        except ShardError as ex:
            if not skip_bad:
                raise
            warnings.warn(f"skipping bad shard: {ex}", stacklevel=2)
            if skipped is not None:
                skipped.append((str(path), str(ex).split(": ", 1)[-1]))


# ---- command line ------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``kpnb data pack SRC --out DIR ...`` (see the module docstring)."""
    p = argparse.ArgumentParser(prog="kpnb data", description="candidate pools as WebDataset shards",
                                epilog="kpnb data filter SHARD_DIR --out DIR: the filter stages over the shards "
                                       "(kpnb.data.stream_filter; kpnb data filter --help)")
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("pack", help="write a source's candidates as resumable tar shards",
                       description="Pack kpnb's or Danbooru2021's layout into WebDataset shards (kpnb.data.shards).")
    k.add_argument("src", metavar="SRC", help="dataset folder: kpnb's layout, or Danbooru2021's (512px/, original/)")
    k.add_argument("--out", required=True, help="shard folder (rerun to resume)")
    k.add_argument("--size", type=int, default=256, help="image size in pixels (square)")
    k.add_argument("--shard-size", type=int, default=1000, help="keypoint ids per shard")
    k.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    k.add_argument("--keypoints", help="keypoint release folder (default SRC/keypoints)")
    k.add_argument("--metadata", help="glob of metadata files (default SRC/metadata.jsonl or metadata/posts*.json)")
    k.add_argument("--limit", type=int, help="pack only the first N keypoint ids")
    k.add_argument("--format", dest="image_format", default="png", choices=IMAGE_FORMATS)
    k.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    try:
        m = pack(open_source(a.src, a.keypoints, a.metadata), a.out, size=a.size, shard_size=a.shard_size,
                 workers=a.workers, limit=a.limit, image_format=a.image_format, progress=a.progress)
    except (DataError, ValueError) as e:
        print(f"kpnb data pack: {e}", file=sys.stderr)
        return 2
    bad = {k: v for k, v in m["problem_counts"].items() if v}
    print(f"kpnb data pack: {m['n_samples']} samples of {m['n_candidates']} keypoint ids in {m['n_shards']} shards "
          f"in {a.out} ({m['shards_packed_this_run']} packed now, {m['seconds_this_run']} s)")
    print("  problems: " + (", ".join(f"{k} {v}" for k, v in bad.items()) if bad else "none")
          + (f"; listed in {Path(a.out) / MANIFEST}" if bad else ""))
    return 0
