"""``kpnb bench data``: the Danbooru-scale data path on synthetic pools of growing size - images/s and peak memory.

``kpnb bench data [--sizes 5000,50000] [--size 256] [--workers 2] [--dir DIR] [--keep]`` writes a synthetic pool of
each size (kpnb's layout, ``kpnb.synth``), then runs, each as its own process as a person would:

1. ``kpnb data pack`` (WebDataset shards, ``--workers`` processes),
2. ``kpnb data filter --no-clip --to-run`` (tags, image and pose stages shard by shard, then the kept subset as
   memory-mapped ``subset/{train,val}.npy``).

For each step it reports wall seconds, images/s, and the peak resident memory of the step's whole process tree
(the main process and its workers, summed, polled from ``/proc`` every 0.1 s); for the filter also images/s of
each stage (from the per-shard records' ``stage_seconds``). The claim to check: peak memory does not grow with
the pool (50k within 1.3x of 5k). Prints JSON; the pools are deleted unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    return kids


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (0 where /proc is not there)."""
    kids, total, todo = _children(), 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            pass
        todo.extend(kids.get(p, []))
    return total


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its wall seconds, exit code, the peak RSS of its process tree, and its output's tail."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tree_rss(proc.pid))
            done.wait(0.1)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    done.set()
    t.join()
    return {"seconds": round(time.time() - t0, 2), "rc": proc.returncode, "peak_rss_mb": round(peak[0] / 2**20, 1),
            "output_tail": out[-2000:]}


def bench_pool(n: int, size: int, workers: int, folder: Path) -> dict[str, Any]:
    """Write, pack and filter one synthetic pool of ``n`` images at ``size`` px under ``folder``."""
    from . import synth
    from .stream_filter import read_config, result_name

    pool, shard_dir, filt, run = (folder / f"{k}-{n}" for k in ("pool", "shards", "filter", "run"))
    t0 = time.time()
    synth.write_dataset(pool, n=n, image_size=size, render_size=size, seed=0, workers=workers, progress=False)
    gen = time.time() - t0
    py = [sys.executable, "-m", "kpnb.cli", "data"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pack = run_measured(py + ["pack", str(pool), "--out", str(shard_dir), "--size", str(size), "--workers", str(workers),
                              "--no-progress"], env)
    if pack["rc"]:
        raise RuntimeError(f"kpnb data pack failed:\n{pack['output_tail']}")
    filt_run = run_measured(py + ["filter", str(shard_dir), "--out", str(filt), "--no-clip", "--workers", str(workers),
                                  "--no-progress", "--to-run", str(run), "--preset", "cpu"], env)
    if filt_run["rc"]:
        raise RuntimeError(f"kpnb data filter failed:\n{filt_run['output_tail']}")
    stage_s: dict[str, float] = {}
    for i in range(read_config(filt)["n_shards"]):
        rec = json.loads((filt / f"{result_name(i)}.json").read_text())
        for k, v in (rec.get("stage_seconds") or {}).items():
            stage_s[k] = stage_s.get(k, 0.0) + v
    for step in (pack, filt_run):
        step.pop("output_tail")
        step["images_per_s"] = round(n / step["seconds"], 1)
    return {"n": n, "size": size, "workers": workers, "generate_seconds": round(gen, 1), "pack": pack,
            "filter_and_subset": filt_run,
            "stage_images_per_s": {k: round(n / v, 1) if v > 0 else None for k, v in stage_s.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kpnb bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="5000,50000", help="comma-separated pool sizes")
    p.add_argument("--size", type=int, default=256, help="image size in pixels")
    p.add_argument("--workers", type=int, default=2, help="processes for pack and filter")
    p.add_argument("--dir", help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the pools, shards and subsets")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    folder = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="kpnb-bench-data-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        rows = [bench_pool(n, a.size, a.workers, folder) for n in sizes]
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    res: dict[str, Any] = {"pools": rows, "cpu_count": os.cpu_count()}
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        res["peak_ratio"] = {step: round(last[step]["peak_rss_mb"] / max(first[step]["peak_rss_mb"], 1e-9), 3)
                             for step in ("pack", "filter_and_subset")}
    print(json.dumps(res, indent=2))
    return 0
