"""``kpnb bench data``: the Danbooru-scale data path on synthetic pools of growing size - images/s and peak memory.

``kpnb bench data [--sizes 5000,50000] [--size 256] [--workers 2] [--filter-workers 0] [--shard-size 1000]
[--kill-test] [--dir DIR] [--keep]`` writes a synthetic pool of each size (kpnb's layout, ``kpnb.synth``), then runs, each as its own
process as a person would:

1. ``kpnb data pack`` (WebDataset shards of ``--shard-size`` images, ``--workers`` processes),
2. ``kpnb data filter --no-clip --to-run`` (``--filter-workers`` DataLoader processes decoding ahead; tags, image and pose stages shard by shard, then the kept subset as
   memory-mapped ``subset/{train,val}.npy``).

For each step it reports wall seconds, images/s, and the peak resident memory of the step's whole process tree
(the main process and its workers, summed, polled from ``/proc`` every 0.1 s); for the filter also images/s of
each stage (from the per-shard records' ``stage_seconds``). The claim to check: peak memory does not grow with
the pool (50k within 1.3x of 5k). Prints JSON; the pools are deleted unless ``--keep``.

``--kill-test`` (:func:`kill_test`) then checks that a killed filter resumes to the same result: the same
``kpnb data filter`` command (same stages, ``--no-clip``, same workers) into a second folder, SIGKILLed - its
whole process group, the main process and its DataLoader workers - once at least half of the shards have a
done-record, then rerun to completion (seconds and peak memory measured as above). What a kill loses is the work
in flight: at most one shard in the main process's stages plus one decoded shard per worker (prefetch factor
1); a shard counts as done only once its record is renamed into place, so the rerun must filter exactly the
shards without a record (``lost_shards``, the finished shards it redid, is 0) and both folders must merge to the
same kept index (every field but the shard folder's path) with byte-identical per-shard results. Reported per
pool under ``kill_test``; the command exits 1 when a kept index differs or a finished shard was redone.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
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


def _records(out: Path) -> dict[str, tuple[int, int]]:
    """The done-records in a filter folder: name -> (inode, mtime ns) (a rewrite renames a new file in)."""
    found = {}
    for p in out.glob("filter-*.json"):
        try:
            st = p.stat()
        except OSError:
            continue
        found[p.name] = (st.st_ino, st.st_mtime_ns)
    return found


def _group_alive(pgid: int) -> int:
    """Processes of process group ``pgid`` still running (zombies not counted)."""
    alive = 0
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
                alive += 1
    return alive


def _comparable(index: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in index.items() if k != "shard_dir"}


def kill_test(shard_dir: str | Path, reference: str | Path, out: str | Path, workers: int,
              env: dict[str, str] | None = None, timeout: float | None = None, poll_s: float = 0.02
              ) -> dict[str, Any]:
    """SIGKILL ``kpnb data filter SHARD_DIR --out OUT --no-clip --workers W`` once at least half of the shards
    have a done-record, rerun it to completion, and compare its kept index with ``reference`` (the folder of an
    uninterrupted run with the same stages over the same shards). See the module docstring.

    ``timeout``: seconds to wait for half of the shards (None: no limit). Raises RuntimeError when the filter
    fails, or ends before it could be killed mid-run (a pool of one shard, a too fast filter: more shards, or
    ``kpnb.data.stream_filter.DELAY_ENV`` in ``env`` to slow each shard down)."""
    from kpnb.data.stream_filter import merge, read_config, result_name

    shard_dir, reference, out = Path(shard_dir), Path(reference), Path(out)
    n_shards = int(read_config(reference)["n_shards"])
    if n_shards < 2:
        raise ValueError(f"{shard_dir}: the kill test needs at least 2 shards, the pool has {n_shards} "
                         "(a smaller --shard-size)")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "kpnb.cli", "data", "filter", str(shard_dir), "--out", str(out), "--no-clip",
           "--workers", str(workers), "--no-progress"]
    log = out.with_name(out.name + ".killed.log")
    t0 = time.time()
    with open(log, "wb") as f:
        # its own session: the kill reaches the DataLoader workers too
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            while 2 * len(_records(out)) < n_shards:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"kpnb data filter ended (exit code {proc.returncode}) before half of the {n_shards} "
                        f"shards were done, so it could not be killed mid-run:\n{log.read_text()[-2000:]}")
                if timeout is not None and time.time() - t0 > timeout:
                    raise RuntimeError(f"fewer than half of the {n_shards} shards done after {timeout} s")
                time.sleep(poll_s)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the main process and its DataLoader workers
            except ProcessLookupError:
                pass
            proc.wait()
    killed_after = time.time() - t0
    deadline = time.time() + 10
    while _group_alive(proc.pid) and time.time() < deadline:  # workers die a moment after the main process
        time.sleep(0.05)
    survivors = _group_alive(proc.pid)
    at_kill = _records(out)
    if (out / "kept.json").exists() or len(at_kill) >= n_shards:
        raise RuntimeError(f"kpnb data filter finished all {n_shards} shards before the kill landed")
    rerun = run_measured(cmd, env)
    if rerun["rc"]:
        raise RuntimeError(f"kpnb data filter (the rerun after the kill) failed:\n{rerun['output_tail']}")
    m = re.search(r"(\d+) shards filtered now, (\d+) already done", rerun["output_tail"])
    if not m:
        raise RuntimeError(f"no summary line in the rerun's output:\n{rerun['output_tail']}")
    redone, skipped = int(m.group(1)), int(m.group(2))
    after = _records(out)
    rewritten = sum(1 for k, v in at_kill.items() if after.get(k) != v)
    new = sum(1 for k in after if k not in at_kill)
    if redone + skipped != n_shards or new + rewritten != redone:
        raise RuntimeError(f"the rerun says {redone} shards filtered and {skipped} skipped, but {new} records are "
                           f"new, {rewritten} rewritten and the pool has {n_shards} shards")
    ref_index, got_index = merge(reference, shard_dir), merge(out, shard_dir)

    def sha1s(folder: Path) -> list[str]:
        return [json.loads((folder / f"{result_name(i)}.json").read_text())["sha1"] for i in range(n_shards)]

    return {"n_shards": n_shards, "records_at_kill": len(at_kill), "killed_after_seconds": round(killed_after, 2),
            "survivors_after_kill": survivors, "shards_redone_by_rerun": redone,
            "lost_shards": redone - (n_shards - len(at_kill)), "finished_records_rewritten": rewritten,
            "kept_equal": _comparable(got_index) == _comparable(ref_index),
            "results_equal": sha1s(out) == sha1s(reference), "kept_n": got_index["n_kept"],
            "rerun_seconds": rerun["seconds"], "rerun_peak_rss_mb": rerun["peak_rss_mb"]}


def bench_pool(n: int, size: int, workers: int, folder: Path, shard_size: int = 1000, kill: bool = False,
               filter_workers: int = 0) -> dict[str, Any]:
    """Write, pack (shards of ``shard_size``, ``workers`` processes) and filter (``filter_workers`` DataLoader
    processes) one synthetic pool of ``n`` images at ``size`` px under ``folder``; with ``kill`` also
    :func:`kill_test` into ``folder/filter-killed-N``."""
    from kpnb import synth
    from kpnb.data.stream_filter import read_config, result_name

    pool, shard_dir, filt, run = (folder / f"{k}-{n}" for k in ("pool", "shards", "filter", "run"))
    t0 = time.time()
    synth.write_dataset(pool, n=n, image_size=size, render_size=size, seed=0, workers=workers, progress=False)
    gen = time.time() - t0
    py = [sys.executable, "-m", "kpnb.cli", "data"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pack = run_measured(py + ["pack", str(pool), "--out", str(shard_dir), "--size", str(size), "--workers", str(workers),
                              "--shard-size", str(shard_size), "--no-progress"], env)
    if pack["rc"]:
        raise RuntimeError(f"kpnb data pack failed:\n{pack['output_tail']}")
    filt_run = run_measured(py + ["filter", str(shard_dir), "--out", str(filt), "--no-clip", "--workers", str(filter_workers),
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
    row = {"n": n, "size": size, "workers": workers, "filter_workers": filter_workers, "shard_size": shard_size, "generate_seconds": round(gen, 1),
           "pack": pack, "filter_and_subset": filt_run,
           "stage_images_per_s": {k: round(n / v, 1) if v > 0 else None for k, v in stage_s.items()}}
    if kill:
        row["kill_test"] = kill_test(shard_dir, filt, folder / f"filter-killed-{n}", filter_workers, env)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kpnb bench data", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="5000,50000", help="comma-separated pool sizes")
    p.add_argument("--size", type=int, default=256, help="image size in pixels")
    p.add_argument("--workers", type=int, default=2, help="processes for the pack")
    # 0: on 2 cores, decoding in the filter's own process was faster (a 2k pool at 256 px: 25 s against 34 s with
    # 2 workers) and each spawned worker costs ~600 MB of torch imports (peak 1.1 GB against 2.9 GB)
    p.add_argument("--filter-workers", type=int, default=0, help="DataLoader processes for the filter")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (kpnb data pack --shard-size)")
    p.add_argument("--kill-test", action="store_true", help="also SIGKILL a second filter run halfway, rerun it and "
                   "check it keeps exactly what the uninterrupted run kept")
    p.add_argument("--dir", help="work folder (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the pools, shards and subsets")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",") if s.strip()]
    folder = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="kpnb-bench-data-"))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        rows = [bench_pool(n, a.size, a.workers, folder, a.shard_size, a.kill_test, a.filter_workers) for n in sizes]
    finally:
        if not a.keep:
            shutil.rmtree(folder, ignore_errors=True)
    res: dict[str, Any] = {"pools": rows, "cpu_count": os.cpu_count()}
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        res["peak_ratio"] = {step: round(last[step]["peak_rss_mb"] / max(first[step]["peak_rss_mb"], 1e-9), 3)
                             for step in ("pack", "filter_and_subset")}
    print(json.dumps(res, indent=2))
    bad = [r["n"] for r in rows if "kill_test" in r and not (r["kill_test"]["kept_equal"]
                                                             and r["kill_test"]["results_equal"]
                                                             and r["kill_test"]["lost_shards"] == 0)]
    if bad:
        print(f"kpnb bench data: kill test failed for pools of {bad}: after the kill and the rerun the kept index "
              "differs from the uninterrupted run's, or finished shards were redone", file=sys.stderr)
        return 1
    return 0
