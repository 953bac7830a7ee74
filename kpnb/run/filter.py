"""``kpnb data filter``: notebook 01's stages over shards, and the kept images as a run folder's subset.

The result folder (``--out``) and a ``--to-run`` folder have one writer (:mod:`kpnb.core.lock`): rank 0 holds
their locks from the start, so a second filter into the same folder is refused before any work, naming the
holder."""
from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
from pathlib import Path
from typing import Any, Mapping

from kpnb.data.folder import DataError
from kpnb.data.stream_filter import KEPT, default_stages, filter_shards, merge, report_table
from kpnb.data.subset import write_subset_memmap


# ---- command line ----------------------------------------------------------------------------------------------
def write_run_subset(shard_dir: str | Path, kept: Mapping[str, Any] | str | Path, run_dir: str | Path, *,
                     val_frac: float, seed: int = 0, progress: bool = False) -> dict[str, int]:
    """The kept images as a run folder's subset, without holding them: split by :func:`kpnb.data.folder.split_of`
    (the hash of the id, as notebook 01 splits) and written as ``<run>/subset/{train,val}.npy`` memmaps with
    their sidecars (:func:`write_subset_memmap`), which :func:`kpnb.data.subset.load_subset` reads in place of the
    ``.npz`` of notebook 01's in-memory path. Returns the count per split."""
    from kpnb.data.folder import split_of

    if isinstance(kept, (str, Path)):
        kept = json.loads(Path(kept).read_text())
    ids, shards_of = list(kept["kept_ids"]), list(kept["kept_shard"])
    counts = {}
    for split in ("train", "val"):
        pick = [i for i, k in enumerate(ids) if split_of(k, val_frac, seed) == split]
        sub = {"kept_ids": [ids[i] for i in pick], "kept_shard": [shards_of[i] for i in pick]}
        write_subset_memmap(shard_dir, sub, Path(run_dir) / "subset" / f"{split}.npy", progress=progress)
        counts[split] = len(pick)
    return counts


def main(argv: list[str] | None = None) -> int:
    """``kpnb data filter SHARD_DIR --out DIR`` (see the module docstring); also under torchrun."""
    p = argparse.ArgumentParser(prog="kpnb data filter", description=(
        "Notebook 01's filter stages over packed shards (kpnb.data.stream_filter): per-shard results, resumable, "
        "shard i on rank i mod world size under torchrun, then the kept index in OUT/kept.json."))
    p.add_argument("shard_dir", metavar="SHARD_DIR", help="folder written by kpnb data pack")
    p.add_argument("--out", required=True, help="result folder (rerun to resume)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes decoding shards (0: none)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-clip", dest="clip", action="store_false", help="tags, image and pose stages only")
    g.add_argument("--clip-run", metavar="RUN", help="the run folder whose CLIP scores the images (its "
                   "clip settings; a domain CLIP not trained yet is trained there first)")
    p.add_argument("--clip-min-score", type=float, help="default: the run's filter.clip_min_score")
    p.add_argument("--device", default="auto", help="device for the CLIP stage (default auto)")
    p.add_argument("--to-run", metavar="RUN", help="then write the kept images as RUN's subset (memory-mapped "
                   "subset/{train,val}.npy, split by RUN's data.val_frac and data.seed), for notebooks 02-08; "
                   "a new RUN folder is made with --preset")
    p.add_argument("--preset", default="gpu", help="preset of a new --to-run folder (default gpu)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    if a.clip and not a.clip_run:
        p.error("the CLIP stage needs --clip-run RUN (the run whose CLIP scores the images); or pass --no-clip")
    from kpnb.core import lock
    from kpnb.core.runtime import dist_env

    with contextlib.ExitStack() as stack:
        if dist_env()[0] == 0:  # rank 0 merges and writes the subset; the other ranks work under its lock
            command = shlex.join(["kpnb", "data", "filter", *(sys.argv[1:] if argv is None else argv)])
            try:
                for folder in [a.out, *([a.to_run] if a.to_run else [])]:
                    stack.enter_context(lock.holding(folder, command))
            except lock.FolderLocked as e:
                print(f"kpnb data filter: {e}", file=sys.stderr)
                return 2
        return _filter(a)


def _filter(a: argparse.Namespace) -> int:
    """``kpnb data filter`` once its arguments are checked and rank 0 holds its folders' locks."""
    from kpnb.core.runtime import Runtime, RuntimeSettingError

    try:
        rt = Runtime.from_settings({"device": a.device if a.clip_run else "cpu", "precision": "fp32",
                                    "compile": False, "workers": 0, "threads": 0})
        stages = default_stages()
        if a.clip_run:
            from kpnb.core.settings import run_config
            from kpnb.run.clip_stage import clip_stage_for_run

            stage, _ = clip_stage_for_run(a.clip_run, run_config(a.clip_run), min_score=a.clip_min_score,
                                          progress=a.progress, runtime=rt)
            stages.append(stage)
        summary = filter_shards(a.shard_dir, a.out, stages, workers=a.workers, runtime=rt,
                                progress=a.progress and rt.is_main)
        rt.barrier()
        if not rt.is_main:
            return 0
        index = merge(a.out)
    except (DataError, ValueError, RuntimeSettingError, OSError) as e:
        print(f"kpnb data filter: {e}", file=sys.stderr)
        return 2
    print(f"kpnb data filter: {summary['shards_filtered']} shards filtered now, {summary['shards_skipped']} "
          f"already done (rank 0 of {summary['world_size']}); kept index in {Path(a.out) / KEPT}")
    print(report_table(index))
    if a.to_run:
        from kpnb.core.settings import ConfigError, run_config
        from kpnb.run.folder import run_dir

        try:
            if not (Path(a.to_run) / "config.json").exists():
                run_dir(a.to_run, a.preset)
            d = run_config(a.to_run)["data"]
            counts = write_run_subset(a.shard_dir, index, a.to_run, val_frac=d["val_frac"], seed=d["seed"],
                                      progress=a.progress)
        except (DataError, ValueError, OSError, ConfigError) as e:
            print(f"kpnb data filter: {e}", file=sys.stderr)
            return 2
        print(f"kpnb data filter: subset of {a.to_run}: {counts['train']} train, {counts['val']} val images "
              f"(memory-mapped subset/*.npy)")
    return 0
