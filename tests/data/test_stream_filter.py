"""kpnb.data.stream_filter: notebook 01's filter over packed shards equals the in-memory chain; resume, ranks, kill."""
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kpnb import cli
from kpnb.data import filtering, shards, subset
from kpnb.data import folder as data
from kpnb.data import stream_filter as sf
from kpnb.run import filter as run_filter
from kpnb.synth.dataset import write_dataset

REPO = Path(__file__).resolve().parents[2]
SIZE, SHARD, N = 32, 8, 40


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "ds"
    write_dataset(root, N, image_size=SIZE, render_size=64, seed=5, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def packed(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed") / "shards"
    shards.pack(synth, out, size=SIZE, shard_size=SHARD, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def reference(synth):
    """The in-memory path of notebook 01: the whole pool, run_chain, report."""
    cands = data.load_candidates(synth, SIZE, progress=False)
    results = filtering.run_chain(cands, sf.default_stages())
    return cands, results, filtering.report(cands, results)


@pytest.fixture(scope="module")
def filtered(packed, tmp_path_factory):
    """The reference streaming run: one worker process decoding ahead."""
    out = tmp_path_factory.mktemp("filtered") / "f"
    summary = sf.filter_shards(packed, out, sf.default_stages(), workers=1, progress=False)
    return out, summary, sf.merge(out)


class Counting:
    """A stage wrapper that records the ids of every call (per shard)."""

    def __init__(self, stage):
        self.stage, self.calls = stage, []
        self.kpnb_fingerprint = sf.describe_stage(stage)

    def __call__(self, cands):
        self.calls.append(list(cands.ids))
        return self.stage(cands)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("filter-*"))}


def test_equals_in_memory_chain(synth, packed, reference, filtered):
    cands, results, rep = reference
    out, summary, index = filtered
    assert summary["shards_filtered"] == 5 and summary["images_filtered"] == N
    keep = filtering.chain_keep(results)
    assert 0 < keep.sum() < N  # the pool has something to remove and something to keep
    assert index["kept_ids"] == [i for i, k in zip(cands.ids, keep) if k]
    assert index["kept_shard"] == [cands.ids.index(i) // SHARD for i in index["kept_ids"]]
    assert index["report"] == rep and index["stages"] == ["tags", "image", "pose"]
    assert json.loads((out / sf.KEPT).read_text()) == index
    lines, names, _ = sf.read_results(out)
    assert [line["id"] for line in lines] == cands.ids
    for r in results:  # every stage's decision, reason and score per id
        assert [line[f"{r.name}.keep"] for line in lines] == r.keep.tolist()
        assert [line[f"{r.name}.reason"] for line in lines] == r.reasons
        for k, v in r.scores.items():
            np.testing.assert_array_equal(np.array([line[f"{r.name}.{k}"] for line in lines], np.float32), v)
    assert [line["label"] for line in lines] == [lab["label"] for lab in cands.labels]
    assert [line["suitable"] for line in lines] == cands.suitable.tolist()
    table = sf.report_table(index)
    assert table.splitlines()[1].startswith("tags") and f"kept {rep['n_kept']} of {N}" in table


def test_stage_called_per_shard_with_its_images(packed, reference, tmp_path):
    cands, _, _ = reference
    seen = []

    def score(images):  # a pluggable CLIP score: mean brightness
        seen.append(images.copy())
        return images.reshape(len(images), -1).mean(1) / 255.0

    stage = sf.clip_stage(score, 0.5, model_id="brightness")
    sf.filter_shards(packed, tmp_path / "f", [*sf.default_stages(), stage], progress=False)
    assert [len(x) for x in seen] == [8, 8, 8, 8, 8]
    np.testing.assert_array_equal(np.concatenate(seen), cands.images)
    index = sf.merge(tmp_path / "f")
    ref = filtering.run_chain(cands, [*sf.default_stages(), stage])
    assert index["report"] == filtering.report(cands, ref) and index["stages"][-1] == "clip"
    assert index["kept_ids"] == [i for i, k in zip(cands.ids, filtering.chain_keep(ref)) if k]
    # another threshold or another model is another configuration
    fps = {sf.stage_fingerprint([stage])[0], sf.stage_fingerprint([sf.clip_stage(score, 0.6, "brightness")])[0],
           sf.stage_fingerprint([sf.clip_stage(score, 0.5, "other")])[0]}
    assert len(fps) == 3


def test_fingerprint_stable_and_threshold_sensitive():
    fp = sf.stage_fingerprint(sf.default_stages())[0]
    assert fp == sf.stage_fingerprint(sf.default_stages())[0]
    other = [sf.default_stages()[0], functools.partial(filtering.stage_image, max_border=0.3), sf.default_stages()[2]]
    assert sf.stage_fingerprint(other)[0] != fp
    closure = [lambda c, t=t: filtering.stage_image(c, max_border=t) for t in (0.25, 0.3)]
    assert sf.stage_fingerprint(closure[:1])[0] != sf.stage_fingerprint(closure[1:])[0]


def test_resume_redoes_only_missing_shard(packed, filtered, tmp_path):
    ref, _, ref_index = filtered
    out = tmp_path / "f"
    shutil.copytree(ref, out)
    (out / "filter-000002.json").unlink()  # killed between the .jsonl and its record
    (out / ".filter-000003.jsonl.abc123.tmp").write_text("half")  # killed while writing
    old = 1_000_000_000
    for p in out.iterdir():
        os.utime(p, ns=(old, old))
    stages = [Counting(s) for s in sf.default_stages()]
    summary = sf.filter_shards(packed, out, stages, progress=False)
    assert summary["shards_filtered"] == 1 and summary["shards_skipped"] == 4
    assert [len(s.calls) for s in stages] == [1, 1, 1] and len(stages[0].calls[0]) == SHARD
    changed = sorted(p.name for p in out.iterdir() if p.stat().st_mtime_ns != old)
    assert changed == ["filter-000002.json", "filter-000002.jsonl", "filter.json"]
    assert not list(out.glob("*.tmp"))
    assert sf.merge(out) == ref_index
    # a changed threshold redoes every shard
    stricter = [sf.default_stages()[0], functools.partial(filtering.stage_image, max_border=0.0),
                sf.default_stages()[2]]
    assert sf.filter_shards(packed, out, stricter, progress=False)["shards_filtered"] == 5


def test_merge_refuses_missing_or_changed_results(filtered, tmp_path):
    out = tmp_path / "f"
    shutil.copytree(filtered[0], out)
    (out / "filter-000004.jsonl").unlink()
    with pytest.raises(data.DataError, match="filter-000004"):
        sf.merge(out)
    shutil.copy(filtered[0] / "filter-000004.jsonl", out)
    p = out / "filter-000001.jsonl"
    p.write_bytes(p.read_bytes().replace(b'"shard": 1', b'"shard": 7', 1))  # same size, other bytes
    with pytest.raises(data.DataError, match="filter-000001.jsonl: sha1"):
        sf.merge(out)
    with pytest.raises(data.DataError, match="no filter configuration"):
        sf.merge(tmp_path / "nothing")


def test_rank_split(packed, filtered, tmp_path):
    out = tmp_path / "f"
    counts = []
    for rank in (0, 1):
        stage = Counting(filtering.stage_tags)
        stages = [stage, *sf.default_stages()[1:]]
        s = sf.filter_shards(packed, out, stages, runtime=SimpleNamespace(rank=rank, world_size=2), progress=False)
        assert s["shards_owned"] == (3 if rank == 0 else 2)
        counts.append([c[0] for c in stage.calls])
    ids = sf.read_results(filtered[0])[0]
    first = [line["id"] for line in ids][::SHARD]
    assert counts == [[first[0], first[2], first[4]], [first[1], first[3]]]
    assert {json.loads((out / f"filter-{i:06d}.json").read_text())["rank"] for i in (1, 3)} == {1}
    index = sf.merge(out)
    assert index["kept_ids"] == filtered[2]["kept_ids"] and index["report"] == filtered[2]["report"]


def test_subset_memmap_round_trip(packed, reference, filtered, tmp_path):
    cands, results, _ = reference
    keep = filtering.chain_keep(results)
    w = subset.write_subset_memmap(packed, filtered[0] / sf.KEPT, tmp_path / "sub" / "kept.npy")
    assert w["n"] == keep.sum() and not list((tmp_path / "sub").glob("*.tmp"))
    got = subset.load_subset_memmap(tmp_path / "sub" / "kept.npy")
    assert isinstance(got["images"], np.memmap) and got["images"].shape == (keep.sum(), SIZE, SIZE, 3)
    np.testing.assert_array_equal(got["images"], cands.images[keep])
    np.testing.assert_array_equal(got["poses"], cands.poses[keep])
    assert got["ids"] == [i for i, k in zip(cands.ids, keep) if k]
    assert [m["labels"] for m in got["meta"]] == [lab for lab, k in zip(cands.labels, keep) if k]
    # a list of ids (every shard is read), resized
    some = [cands.ids[3], cands.ids[30]]
    subset.write_subset_memmap(packed, some, tmp_path / "two.npy", size=16)
    two = subset.load_subset_memmap(tmp_path / "two.npy")
    assert two["images"].shape == (2, 16, 16, 3) and two["ids"] == some
    with pytest.raises(data.DataError, match="not found"):
        subset.write_subset_memmap(packed, ["no-such-id"], tmp_path / "none.npy")
    assert not (tmp_path / "none.npy").exists() and not list(tmp_path.glob(".*.tmp"))


def test_run_subset_from_shards_reads_like_notebook_01s(packed, reference, filtered, tmp_path):
    """pack -> filter -> write_run_subset gives a run folder whose load_subset equals what notebook 01's in-memory
    path packs (the same ids per split, images, poses, captions, attributes), held as a memmap."""
    cands, results, _ = reference
    keep = np.flatnonzero(filtering.chain_keep(results))
    counts = run_filter.write_run_subset(packed, filtered[0] / sf.KEPT, tmp_path / "run", val_frac=0.25, seed=3)
    for split in ("train", "val"):
        sel = [i for i in keep if data.split_of(cands.ids[i], 0.25, 3) == split]
        subset.save_subset(tmp_path / "ref", split, ids=[cands.ids[i] for i in sel], images=cands.images[sel],
                         poses=cands.poses[sel], captions=[cands.labels[i].get("caption", "") for i in sel],
                         attrs=[cands.labels[i].get("attributes", {}) for i in sel])
        got, want = subset.load_subset(tmp_path / "run", split), subset.load_subset(tmp_path / "ref", split)
        assert isinstance(got["images"], np.memmap) and counts[split] == len(sel) > 0
        for k in ("ids", "images", "poses", "captions"):
            np.testing.assert_array_equal(got[k], want[k])
        assert got["attrs"] == want["attrs"]


def test_killed_filter_resumes_to_identical_index(packed, filtered, tmp_path):
    out = tmp_path / "f"
    env = {**os.environ, "PYTHONPATH": str(REPO), sf.DELAY_ENV: "0.5"}
    proc = subprocess.Popen([sys.executable, "-m", "kpnb.cli", "data", "filter", str(packed), "--out", str(out),
                             "--no-clip", "--workers", "1", "--no-progress"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while len(list(out.glob("filter-*.json"))) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no two shards finished within 90 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the filter and its DataLoader worker
        proc.wait()
    n_done = len(list(out.glob("filter-*.json")))
    assert 2 <= n_done < 5 and not (out / sf.KEPT).exists()
    s = sf.filter_shards(packed, out, sf.default_stages(), progress=False)
    assert s["shards_filtered"] == 5 - n_done  # nothing finished was redone
    assert sf.merge(out) == filtered[2]
    assert {k: v for k, v in _files(out).items() if k.endswith(".jsonl")} == \
        {k: v for k, v in _files(filtered[0]).items() if k.endswith(".jsonl")}


def test_cli(packed, filtered, tmp_path, capsys):
    out = tmp_path / "f"
    assert cli.main(["data", "filter", str(packed), "--out", str(out), "--no-clip", "--workers", "0",
                     "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "5 shards filtered now" in text and "kept" in text
    assert json.loads((out / sf.KEPT).read_text())["kept_ids"] == filtered[2]["kept_ids"]
    from kpnb.core import settings

    run = tmp_path / "run"  # made by the command, with the preset given
    assert cli.main(["data", "filter", str(packed), "--out", str(out), "--no-clip", "--workers", "0",
                     "--no-progress", "--to-run", str(run), "--preset", "smoke"]) == 0
    assert settings.run_config(run)["data"]["val_frac"] == settings.preset_config("smoke")["data"]["val_frac"]
    assert "0 shards filtered now" in capsys.readouterr().out  # resumed: all done before
    got = subset.load_subset(run, "train")
    assert len(got["ids"]) + len(subset.load_subset(run, "val")["ids"]) == len(filtered[2]["kept_ids"])
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "filter", str(packed), "--out", str(out)])
    assert e.value.code == 2 and "--clip-run" in capsys.readouterr().err
    assert cli.main(["data", "filter", str(tmp_path / "nowhere"), "--out", str(out), "--no-clip"]) == 2
    assert "no shard manifest" in capsys.readouterr().err


def test_messy_pool_empty_shard_and_problems(tmp_path):
    """kpnb's layout with bad files (no labels): an empty shard, and n_skipped_files as load_candidates counts."""
    from PIL import Image
    from test_data import _write_pose

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "keypoints").mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 30, 3), 60 + i * 30, np.uint8)).save(root / "images" / f"{i}.png")
        _write_pose(root / "keypoints" / f"{i}.json", i)
    (root / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "keypoints" / "3.json").write_text("{oops")
    (root / "metadata.jsonl").write_text('{"id": "0", "tag_string": "solo", "rating": "s"}\n'
                                         '{"id": "2", "tag_string": "comic", "rating": "s"}\nnot json\n')
    cands = data.load_candidates(root, 16, progress=False)
    results = filtering.run_chain(cands, sf.default_stages())
    shards.pack(root, tmp_path / "shards", size=16, shard_size=1, workers=1, progress=False)
    s = sf.filter_shards(tmp_path / "shards", tmp_path / "f", sf.default_stages(), progress=False)
    assert s["shards_filtered"] == 5  # ids 0..4, shards of 1: "1" and "3" are empty
    index = sf.merge(tmp_path / "f")
    assert index["report"] == filtering.report(cands, results) and index["report"]["n_skipped_files"] == 3
    assert index["kept_ids"] == [i for i, k in zip(cands.ids, filtering.chain_keep(results)) if k]
    assert "precision" in index["report"] and index["report"]["precision"] is None
    assert sf.read_results(tmp_path / "f")[0][1]["tags.reason"] == "tag: comic"


def test_bench_kill_test_resumes_to_identical_index(tmp_path):
    """kpnb bench data --kill-test's check on a tiny pool: killed (process group) with some shards done, the rerun
    filters exactly the others, and the kept index equals the uninterrupted run's."""
    from kpnb.run import bench_data

    write_dataset(tmp_path / "ds", 120, image_size=SIZE, render_size=SIZE, seed=2, workers=1, progress=False)
    shards.pack(tmp_path / "ds", tmp_path / "shards", size=SIZE, shard_size=20, workers=1, progress=False)
    sf.filter_shards(tmp_path / "shards", tmp_path / "ref", sf.default_stages(), progress=False)
    env = {**os.environ, "PYTHONPATH": str(REPO), sf.DELAY_ENV: "0.3"}
    r = bench_data.kill_test(tmp_path / "shards", tmp_path / "ref", tmp_path / "killed", workers=1, env=env,
                             timeout=90)
    assert r["n_shards"] == 6 and 3 <= r["records_at_kill"] < 6 and r["survivors_after_kill"] == 0
    assert r["shards_redone_by_rerun"] == 6 - r["records_at_kill"]
    assert r["lost_shards"] == 0 and r["finished_records_rewritten"] == 0
    assert r["kept_equal"] and r["results_equal"] and 0 < r["kept_n"] < 120
    assert r["rerun_seconds"] > 0 and r["rerun_peak_rss_mb"] > 10
    shards.pack(tmp_path / "ds", tmp_path / "one", size=SIZE, shard_size=200, workers=1, progress=False)
    sf.filter_shards(tmp_path / "one", tmp_path / "ref1", sf.default_stages(), progress=False)
    with pytest.raises(ValueError, match="at least 2 shards"):  # one shard cannot be killed halfway
        bench_data.kill_test(tmp_path / "one", tmp_path / "ref1", tmp_path / "k1", workers=1, env=env)


def test_bench_data_flags_and_kill_test_failure(monkeypatch, tmp_path, capsys):
    """--shard-size and --kill-test reach each pool's bench; a kept index that differs after the kill exits 1."""
    from kpnb.run import bench_data

    calls = []

    def fake(n, size, workers, folder, shard_size, kill, filter_workers):
        calls.append((n, shard_size, kill, filter_workers))
        row = {"n": n, "pack": {"peak_rss_mb": 1.0}, "filter_and_subset": {"peak_rss_mb": 1.0}}
        row["kill_test"] = {"kept_equal": n == 10, "results_equal": True, "lost_shards": 0}
        return row

    monkeypatch.setattr(bench_data, "bench_pool", fake)
    argv = ["--sizes", "10", "--shard-size", "20", "--kill-test", "--filter-workers", "1", "--dir", str(tmp_path / "b")]
    assert bench_data.main(argv) == 0 and calls == [(10, 20, True, 1)]
    assert bench_data.main(["--sizes", "10,30", "--dir", str(tmp_path / "b")]) == 1
    assert "kill test failed for pools of [30]" in capsys.readouterr().err
