"""Notebook 01's filter over packed shards, one shard in memory at a time: ``kpnb data filter``.

``kpnb data filter SHARD_DIR --out DIR [--workers N] [--no-clip | --clip-run RUN]`` runs the filter stages of
:mod:`kpnb.data.filtering` (tags, image, pose, optionally CLIP) over a folder written by ``kpnb data pack``
(:mod:`kpnb.data.shards`) and writes into DIR::

    filter.json            the stage configuration: each stage described, its fingerprint, the shard folder
    filter-000000.jsonl    one line per sample of shard 0: id, shard, the chain's keep, per stage
                           ``<stage>.keep``, ``<stage>.reason`` and every score as ``<stage>.<score>`` (a plain
                           float; None where not finite); ``label`` and ``suitable`` when the sample's meta has
                           labels (synthetic pools)
    filter-000000.json     the shard's done-record: fingerprint, the shard's sha1, the stage names, counts,
                           the size and sha1 of the .jsonl
    kept.json              written by :func:`merge`: the kept ids in shard order with their shard index, and
                           :func:`kpnb.data.filtering.report`'s numbers over the whole pool

How it runs (:func:`filter_shards`): a ``torch.utils.data.DataLoader`` over this rank's unfinished shard
indices decodes whole shards (``workers`` processes, or the main process with 0) ahead of the stages, which
run in the main process (so a CLIP on the GPU is used from one place) on a per-shard
:class:`kpnb.data.folder.Candidates`. Memory is bounded by the shards in flight (about ``2 * workers + 1``), never
the pool.

Resumable and atomic: the .jsonl and then the record are each written to a temporary file and renamed, so a
shard counts as done only once both exist. A rerun skips a shard whose record has the same stage fingerprint
and shard sha1 and whose .jsonl has the recorded size; changed thresholds (a different fingerprint) or a
repacked shard redo it. A killed filter loses only the shard whose stages were running.

Ranks: shard i belongs to rank ``i % world_size``; each rank writes only its own shards' files. After a barrier
rank 0 calls :func:`merge`, which refuses to merge while any shard of the manifest lacks a current result.

Equal to the in-memory path: no stage fits anything on the pool - tags, image features, pose plausibility
and the CLIP probability are decisions per image against fixed thresholds - so running the chain shard by
shard gives the same keep decisions as :func:`kpnb.data.filtering.run_chain` on the whole pool, and :func:`merge`
computes the report with :func:`kpnb.data.filtering.report` itself from the per-shard lines. (Only the report's
precision and recall are pool-wide; they are computed in the merge.) The pool's ``n_skipped_files`` comes
from the manifest's problem counts.

The stage fingerprint (:func:`stage_fingerprint`) describes each stage callable: a function by its module,
qualified name, a hash of its code and its default arguments; a ``functools.partial`` by its function and
bound arguments; a closure by the values it closes over; an object with a ``kpnb_fingerprint`` attribute by
that. Globals a lambda reads are not seen, so a stage whose thresholds live in globals should be a
``functools.partial`` (as :func:`default_stages` and :func:`clip_stage` build) for a changed threshold to
redo the shards.

:func:`write_subset_memmap` materialises the kept images as a ``.npy`` memmap, shard by shard.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from kpnb.core import progress as kprogress
from kpnb.core.files import atomic_write_bytes, write_json
from kpnb.data import filtering
from kpnb.data import shards as kshards
from kpnb.data.folder import Candidates, DataError, Problems
from kpnb.data.shard_io import FILTER, read_format_json

FORMAT = FILTER.format
CONFIG = "filter.json"
KEPT = "kept.json"
DELAY_ENV = FILTER.delay_env  # test hook: seconds to sleep per shard before its result is written

Stage = Callable[[Any], filtering.StageResult]


def result_name(index: int) -> str:
    return FILTER.name(index)


# ---- the stage configuration and its fingerprint ---------------------------------------------------------
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # object reprs carry addresses that change every run


def _value(v: Any) -> Any:
    """A JSON-able, run-independent description of a stage argument."""
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else repr(v)
    if isinstance(v, np.generic):
        return _value(v.item())
    if isinstance(v, np.ndarray):
        return {"ndarray": list(v.shape), "dtype": str(v.dtype),
                "sha1": hashlib.sha1(np.ascontiguousarray(v).tobytes()).hexdigest()}
    if isinstance(v, Mapping):
        return {str(k): _value(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    if isinstance(v, (set, frozenset)):
        return sorted((_value(x) for x in v), key=repr)
    if callable(v):
        return describe_stage(v)
    return _ADDRESS.sub("", repr(v))


def describe_stage(stage: Callable) -> Any:
    """What a stage's fingerprint is made of (see the module docstring)."""
    fp = getattr(stage, "kpnb_fingerprint", None)
    if fp is not None:
        return _value(fp)  # stands for the stage: a wrapper can give the description of what it wraps
    if isinstance(stage, functools.partial):
        return {"partial": describe_stage(stage.func), "args": _value(stage.args),
                "keywords": _value(stage.keywords)}
    if inspect.isfunction(stage):
        code = stage.__code__
        out: dict[str, Any] = {
            "function": f"{stage.__module__}.{stage.__qualname__}",
            "code": hashlib.sha1(code.co_code + _ADDRESS.sub("", repr(code.co_consts)).encode()).hexdigest()[:16],
            "defaults": _value(stage.__defaults__ or ()), "kwdefaults": _value(stage.__kwdefaults__ or {})}
        if stage.__closure__:
            out["closure"] = [_value(c.cell_contents) for c in stage.__closure__]
        return out
    if inspect.ismethod(stage):
        return {"method": describe_stage(stage.__func__), "self": _ADDRESS.sub("", repr(stage.__self__))}
    return {"object": f"{type(stage).__module__}.{type(stage).__qualname__}",
            "repr": _ADDRESS.sub("", repr(stage))}


def stage_fingerprint(stages: Sequence[Stage]) -> tuple[str, list[Any]]:
    """``(sha1 hex, descriptions)`` of a stage list: equal when the stages and their thresholds are."""
    described = [describe_stage(s) for s in stages]
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest(), described


def default_stages() -> list[Stage]:
    """Notebook 01's stages without CLIP: tags, image, pose with their default thresholds."""
    return [functools.partial(filtering.stage_tags), functools.partial(filtering.stage_image),
            functools.partial(filtering.stage_pose)]


def clip_stage(score_fn: Callable[[np.ndarray], np.ndarray], min_score: float, model_id: str) -> Stage:
    """The CLIP stage with a pluggable ``score_fn(images uint8 [N,S,S,3]) -> [N]`` (e.g.
    ``lambda ims: clip_filter_scores(model, ims, CLIP_POSITIVE, CLIP_NEGATIVES)``). ``model_id`` names the
    model in the fingerprint (its weights are not hashed), so a different CLIP redoes the shards."""
    stage = functools.partial(filtering.stage_clip, score_fn=score_fn, min_score=float(min_score))
    stage.kpnb_fingerprint = {"stage": "clip", "min_score": float(min_score), "model": str(model_id),  # type: ignore[attr-defined]
                              "positive": filtering.CLIP_POSITIVE, "negatives": list(filtering.CLIP_NEGATIVES)}
    return stage


# ---- decoding: one shard per DataLoader item ---------------------------------------------------------------
class ShardDataset:
    """Map-style dataset: item k is shard ``indices[k]`` of a packed folder, decoded as a dict with ``index``,
    ``ids``, ``images`` uint8 [n,S,S,3], ``poses`` float32 [n,17,3] and ``meta``. Picklable (spawned workers)."""

    def __init__(self, shard_dir: str | Path, indices: Sequence[int], size: int, verify: bool = True):
        self.shard_dir, self.indices, self.size, self.verify = str(shard_dir), list(indices), int(size), verify

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict[str, Any]:
        index = self.indices[k]
        ids, ims, poses, metas = [], [], [], []
        for key, im, pose, meta in kshards.iter_shards(self.shard_dir, [index], verify=self.verify):
            ids.append(key)
            ims.append(im)
            poses.append(pose)
            metas.append(meta)
        n = len(ids)
        return {"index": index, "ids": ids, "meta": metas,
                "images": np.stack(ims) if n else np.zeros((0, self.size, self.size, 3), np.uint8),
                "poses": np.stack(poses) if n else np.zeros((0, 17, 3), np.float32)}


def _as_is(item: Any) -> Any:
    """The DataLoader's collate_fn: keep numpy arrays (the default would turn them into tensors)."""
    return item


def shard_candidates(item: Mapping[str, Any], shard_dir: str | Path) -> Candidates:
    """A decoded shard as the :class:`kpnb.data.folder.Candidates` the stages take (labels from ``meta["labels"]``)."""
    metas = item["meta"]
    labels = [m.get("labels", {}) for m in metas] if any("labels" in m for m in metas) else None
    return Candidates(root=Path(shard_dir) / f"{kshards.shard_name(item['index'])}.tar", ids=list(item["ids"]),
                      images=item["images"], poses=item["poses"], meta=metas, labels=labels, problems=Problems())


# ---- one shard ---------------------------------------------------------------------------------------------
def _plain(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def _lines(cands: Candidates, index: int, results: list[filtering.StageResult]) -> list[dict[str, Any]]:
    chain = filtering.chain_keep(results) if results else np.ones(len(cands), bool)
    out = []
    for i, key in enumerate(cands.ids):
        line: dict[str, Any] = {"id": key, "shard": index, "keep": bool(chain[i])}
        for r in results:
            line[f"{r.name}.keep"] = bool(r.keep[i])
            line[f"{r.name}.reason"] = r.reasons[i]
            for k, v in r.scores.items():
                line[f"{r.name}.{k}"] = _plain(v[i])
        lab = cands.meta[i].get("labels")
        if lab is not None:  # as filtering.report reads a label record
            line["label"] = lab.get("label", "?")
            line["suitable"] = bool(lab.get("suitable"))
        out.append(line)
    return out


def run_shard(item: Mapping[str, Any], stages: Sequence[Stage], shard_dir: str | Path, timings: dict | None = None
              ) -> tuple[list[dict[str, Any]], list[str] | None]:
    """The stage chain on one decoded shard (each stage on every image, as :func:`kpnb.data.filtering.run_chain`):
    its result lines and the stage names (None for an empty shard, whose stages are not called). ``timings``,
    when given, gets each stage's seconds added under its name."""
    cands = shard_candidates(item, shard_dir)
    if not len(cands):
        return [], None
    results = []
    for stage in stages:
        t0 = time.perf_counter()
        results.append(stage(cands))
        if timings is not None:
            timings[results[-1].name] = timings.get(results[-1].name, 0.0) + time.perf_counter() - t0
    where = Path(shard_dir) / f"{kshards.shard_name(item['index'])}.tar"
    for r in results:
        if len(r.keep) != len(cands) or len(r.reasons) != len(cands):
            raise ValueError(f"{where}: stage {r.name!r} returned {len(r.keep)} decisions for {len(cands)} images")
    return _lines(cands, item["index"], results), [r.name for r in results]


@dataclass
class _Outcome:
    """What the stages made of one shard (:func:`run_shard`) and how long it took."""

    lines: list[dict[str, Any]]
    names: list[str] | None
    seconds: float
    stage_seconds: Mapping[str, float]


def _write_result(out: Path, index: int, entry: Mapping[str, Any], fingerprint: str, rank: int,
                  outcome: _Outcome) -> dict[str, Any]:
    name = result_name(index)
    lines = outcome.lines
    body = "".join(json.dumps(line) + "\n" for line in lines).encode()
    atomic_write_bytes(out / f"{name}.jsonl", body)
    record = {"format": FORMAT, "index": index, "shard_file": entry["file"], "shard_sha1": entry["sha1"],
              "fingerprint": fingerprint, "stages": outcome.names, "n": len(lines),
              "n_kept": sum(1 for line in lines if line["keep"]), "file": f"{name}.jsonl", "bytes": len(body),
              "sha1": hashlib.sha1(body).hexdigest(), "rank": rank, "seconds": round(outcome.seconds, 3),
              "stage_seconds": {k: round(v, 6) for k, v in outcome.stage_seconds.items()}}
    write_json(out / f"{name}.json", record)  # last: the shard is done once this exists
    return record


def _done_record(out: Path, index: int, entry: Mapping[str, Any], fingerprint: str) -> dict[str, Any] | None:
    """The shard's record when its result is current (same stages, same shard bytes), else None."""
    return FILTER.done_record(out, index, {"format": FORMAT, "fingerprint": fingerprint, "shard_sha1": entry["sha1"]})


# ---- the filter ----------------------------------------------------------------------------------------------
def filter_shards(shard_dir: str | Path, out_dir: str | Path, stages: Sequence[Stage], *, workers: int = 0,
                  runtime: Any = None, progress: bool = True, verify: bool = True,
                  mp_context: str = "spawn") -> dict[str, Any]:
    """Run ``stages`` over this rank's shards of ``shard_dir`` into ``out_dir`` (see the module docstring).

    ``runtime``: anything with ``rank`` and ``world_size`` (a :class:`kpnb.core.runtime.Runtime`); None is rank 0 of
    1. ``workers``: DataLoader processes decoding shards ahead (started with ``mp_context``; 0 decodes in this
    process). ``verify``: check each shard's sha1 against the manifest before reading it. Returns a summary:
    shards owned, skipped as finished, filtered now, images filtered now, seconds. Call :func:`merge` on rank 0
    after a barrier."""
    import torch.utils.data

    shard_dir, out = Path(shard_dir), Path(out_dir)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    manifest = kshards.read_manifest(shard_dir)
    rank = int(getattr(runtime, "rank", 0)) if runtime is not None else 0
    world = int(getattr(runtime, "world_size", 1)) if runtime is not None else 1
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    fingerprint, described = stage_fingerprint(stages)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        write_json(out / CONFIG, {"format": FORMAT, "shard_dir": str(shard_dir.resolve()),
                                  "fingerprint": fingerprint, "stages": described,
                                  "n_shards": manifest["n_shards"], "world_size": world})
    FILTER.remove_temps(out, owns=lambda i: i % world == rank)  # a killed run's, for this rank's shards
    entries = manifest["shards"]
    mine = [i for i in range(len(entries)) if i % world == rank]
    todo = [i for i in mine if _done_record(out, i, entries[i], fingerprint) is None]

    t0 = time.time()
    n_images = 0
    delay = FILTER.delay()
    bar = kprogress.bar(total=len(mine), initial=len(mine) - len(todo), desc=f"filtering shards (rank {rank})",
                        disable=not progress, unit_label="shard", report=rank == 0)
    try:
        if todo:
            ds = ShardDataset(shard_dir, todo, manifest["size"], verify=verify)
            loader = torch.utils.data.DataLoader(
                ds, batch_size=None, shuffle=False, num_workers=workers, collate_fn=_as_is,
                multiprocessing_context=mp_context if workers else None,
                # one decoded shard waiting per worker: a shard of 256 px images is ~200 MB
                prefetch_factor=1 if workers else None)
            for item in loader:
                t_shard = time.time()
                timings: dict[str, float] = {}
                lines, names = run_shard(item, stages, shard_dir, timings)
                if delay:
                    time.sleep(delay)
                _write_result(out, item["index"], entries[item["index"]], fingerprint, rank,
                              _Outcome(lines, names, time.time() - t_shard, timings))
                n_images += len(lines)
                bar.set_postfix(images_per_s=f"{n_images / max(time.time() - t0, 1e-6):.1f}", refresh=False)
                bar.update(1)
    finally:
        bar.close()
    return {"rank": rank, "world_size": world, "fingerprint": fingerprint, "shards_owned": len(mine),
            "shards_skipped": len(mine) - len(todo), "shards_filtered": len(todo), "images_filtered": n_images,
            "seconds": round(time.time() - t0, 2)}


# ---- merging -------------------------------------------------------------------------------------------------
def read_config(out_dir: str | Path) -> dict[str, Any]:
    return read_format_json(Path(out_dir) / CONFIG, FORMAT, "no filter configuration; run kpnb data filter first")


def read_results(out_dir: str | Path, shard_dir: str | Path | None = None
                 ) -> tuple[list[dict[str, Any]], list[str], dict[str, Any]]:
    """Every shard's result lines in manifest order, the stage names, and the manifest. Raises DataError naming
    the shards whose result is missing or stale (other stages, repacked shard) or whose .jsonl was changed."""
    out = Path(out_dir)
    cfg = read_config(out)
    manifest = kshards.read_manifest(shard_dir or cfg["shard_dir"])
    records, missing = [], []
    for i, e in enumerate(manifest["shards"]):
        rec = _done_record(out, i, e, cfg["fingerprint"])
        if rec is None:
            missing.append(result_name(i))
        records.append(rec)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise DataError(f"{out}: {len(missing)} of {len(records)} shard results missing or stale ({shown}); "
                        "run the filter again (it does only those)")
    names: list[str] | None = None
    lines: list[dict[str, Any]] = []
    for rec, e in zip(records, manifest["shards"]):
        path = out / rec["file"]
        body = path.read_bytes()
        if hashlib.sha1(body).hexdigest() != rec["sha1"]:
            raise DataError(f"{path}: sha1 differs from its record {rec['file'][:-1]} (changed after writing)")
        shard_lines = [json.loads(t) for t in body.decode().splitlines() if t.strip()]
        if len(shard_lines) != rec["n"] or rec["n"] != e["n"]:
            raise DataError(f"{path}: {len(shard_lines)} lines, record says {rec['n']}, shard {e['file']} has {e['n']}")
        if rec["stages"] is not None:
            if names is None:
                names = rec["stages"]
            elif rec["stages"] != names:
                raise DataError(f"{path}: stages {rec['stages']} differ from the other shards' {names}")
        lines.extend(shard_lines)
    return lines, names or [], manifest


class _Pool:
    """What :func:`kpnb.data.filtering.report` reads of a Candidates (length, suitable, labels, problems.total)."""

    def __init__(self, lines: list[dict[str, Any]], manifest: Mapping[str, Any]):
        has_labels = any("label" in line for line in lines)
        self.n = len(lines)
        self.labels = [{"label": line.get("label", "?")} for line in lines] if has_labels else None
        self.suitable = np.array([bool(line.get("suitable", False)) for line in lines]) if has_labels else None
        self.problems = SimpleNamespace(total=sum(manifest.get("problem_counts", {}).values()))

    def __len__(self) -> int:
        return self.n


def stage_results(lines: list[dict[str, Any]], names: list[str]) -> list[filtering.StageResult]:
    """Per stage, the pool's keep mask and reasons as :class:`kpnb.data.filtering.StageResult` (scores left out)."""
    return [filtering.StageResult(n, np.array([bool(line[f"{n}.keep"]) for line in lines], dtype=bool),
                                  [line[f"{n}.reason"] for line in lines]) for n in names]


def pool_results(out_dir: str | Path) -> tuple[list[filtering.StageResult], np.ndarray | None, dict[str, int]]:
    """The whole pool's stage results from the shards' results, for what notebook 01 computes beyond the report
    (e.g. the chain without its CLIP stage): (results per stage, ground-truth "suitable" or None, the manifest's
    problem counts)."""
    lines, names, manifest = read_results(out_dir)
    pool = _Pool(lines, manifest)
    return stage_results(lines, names), pool.suitable, dict(manifest.get("problem_counts", {}))


def preview(shard_dir: str | Path, n: int) -> Candidates:
    """The first ``n`` candidates of a packed pool (whole shards in manifest order, cut at ``n``), in memory: what
    notebook 01 draws its figures from when the pool itself stays in its shards."""
    manifest = kshards.read_manifest(shard_dir)
    size, parts, got = int(manifest["size"]), [], 0
    for index in range(manifest["n_shards"]):
        if got >= n:
            break
        c = shard_candidates(ShardDataset(shard_dir, [index], size)[0], shard_dir)
        parts.append(c)
        got += len(c)
    ids = [i for c in parts for i in c.ids][:n]
    k = len(ids)
    labels = [lab for c in parts for lab in (c.labels or [{}] * len(c))][:k] if any(c.labels for c in parts) else None
    return Candidates(root=Path(shard_dir), ids=ids,
                      images=np.concatenate([c.images for c in parts])[:k] if parts else np.zeros((0, size, size, 3), np.uint8),
                      poses=np.concatenate([c.poses for c in parts])[:k] if parts else np.zeros((0, 17, 3), np.float32),
                      meta=[m for c in parts for m in c.meta][:k], labels=labels, problems=Problems())


def merge(out_dir: str | Path, shard_dir: str | Path | None = None) -> dict[str, Any]:
    """The kept index from every shard's result (call on rank 0 after the barrier): writes ``kept.json``
    atomically and returns it: ``kept_ids`` (shard order) with ``kept_shard`` (the shard index of each),
    ``stages``, ``report`` (:func:`kpnb.data.filtering.report`'s numbers), counts and the fingerprint."""
    out = Path(out_dir)
    cfg = read_config(out)
    lines, names, manifest = read_results(out, shard_dir)
    results = stage_results(lines, names)
    pool = _Pool(lines, manifest)
    rep = filtering.report(pool, results) if results else {
        "n_candidates": len(lines), "n_skipped_files": pool.problems.total, "n_kept": len(lines)}
    kept = [line for line in lines if line["keep"]]
    index = {"format": FORMAT, "shard_dir": str(shard_dir or cfg["shard_dir"]), "fingerprint": cfg["fingerprint"],
             "stages": names, "n_shards": manifest["n_shards"], "n_candidates": len(lines), "n_kept": len(kept),
             "report": rep, "kept_ids": [line["id"] for line in kept], "kept_shard": [line["shard"] for line in kept]}
    write_json(out / KEPT, index)
    return index


def report_table(index: Mapping[str, Any]) -> str:
    """Notebook 01's stage table from a kept index."""
    rep = index["report"]

    def fmt(v: Any) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    rows = [f"{'stage':8} {'removed alone':>14} {'removed in chain':>17} {'prec alone':>11} {'rec alone':>10} "
            f"{'prec chain':>11} {'rec chain':>10}"]
    for n in index["stages"]:
        rows.append(f"{n:8} {rep[n + '.removed_alone']:>14} {rep[n + '.removed_in_chain']:>17} "
                    f"{fmt(rep[n + '.precision_alone']):>11} {fmt(rep[n + '.recall_alone']):>10} "
                    f"{fmt(rep[n + '.precision_chain']):>11} {fmt(rep[n + '.recall_chain']):>10}")
    rows.append(f"kept {rep['n_kept']} of {rep['n_candidates']}: precision {fmt(rep.get('precision'))}, "
                f"recall {fmt(rep.get('recall'))}")
    return "\n".join(rows)
