"""kpnb.data.danbooru (sources read in place) and kpnb.data.shards (resumable WebDataset shards, kpnb data pack)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kpnb import cli
from kpnb.data import danbooru, shards
from kpnb.data import folder as data
from kpnb.poses import formats as pose_formats
from kpnb.synth.dataset import write_dataset

REPO = Path(__file__).resolve().parents[2]
SIZE, SHARD = 32, 8


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "ds"
    write_dataset(root, 30, image_size=SIZE, render_size=64, seed=3, workers=1, progress=False)
    return root


@pytest.fixture(scope="module")
def packed(synth, tmp_path_factory):
    """The reference pack: 30 candidates, shards of 8, two worker processes."""
    out = tmp_path_factory.mktemp("packed") / "shards"
    m = shards.pack(synth, out, size=SIZE, shard_size=SHARD, workers=2, progress=False)
    return out, m


def _tars(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("shard-*.tar"))}


def test_pack_round_trip(synth, packed):
    out, m = packed
    assert m["n_shards"] == 4 and [s["n"] for s in m["shards"]] == [8, 8, 8, 6] and m["n_samples"] == 30
    for s in m["shards"]:
        assert shards.file_sha1(out / s["file"]) == s["sha1"] and (out / s["file"]).stat().st_size == s["bytes"]
        assert s["problems"] == []
    assert json.loads((out / "manifest.json").read_text()) == m
    assert not list(out.glob("*.tmp"))
    got = list(shards.iter_shards(out))
    ref = data.load_candidates(synth, SIZE, progress=False)
    assert [k for k, *_ in got] == ref.ids == sorted(ref.ids, key=int)
    labels = {str(r["id"]): r for r in data.read_jsonl(synth / "labels.jsonl")}
    for (key, image, pose, meta), i in zip(got, range(len(ref))):
        assert image.dtype == np.uint8 and image.shape == (SIZE, SIZE, 3)
        assert np.array_equal(image, data.load_image(synth / "images" / f"{key}.png", SIZE))
        assert np.array_equal(image, ref.images[i])
        assert np.array_equal(pose, pose_formats.read_release_json(synth / "keypoints" / f"{key}.json").to_array())
        assert meta["tag_names"] == ref.meta[i]["tag_names"] and meta["rating"] == ref.meta[i]["rating"]
        assert meta["width"] == SIZE and meta["labels"] == labels[key]
    # a chosen shard, by index or name
    assert [k for k, *_ in shards.iter_shards(out, [1])] == ref.ids[8:16]
    assert [k for k, *_ in shards.iter_shards(out, ["shard-000003.tar"])] == ref.ids[24:]


def test_resume_rewrites_only_the_missing_shard(synth, packed, tmp_path):
    ref, m0 = packed
    out = tmp_path / "shards"
    shutil.copytree(ref, out)
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.json").unlink()
    (out / "shard-000001.tar.tmp").write_bytes(b"half a shard")  # as a killed pack leaves it
    (out / ".shard-000001.json.k1ll3d.tmp").write_text("{")  # killed while writing the done-record
    old = 1_000_000_000
    for p in out.iterdir():
        os.utime(p, ns=(old, old))
    m = shards.pack(synth, out, size=SIZE, shard_size=SHARD, workers=1, progress=False)
    assert m["shards_packed_this_run"] == 1
    changed = sorted(p.name for p in out.iterdir() if p.stat().st_mtime_ns != old)
    assert changed == ["manifest.json", "shard-000001.json", "shard-000001.tar"]
    assert _tars(out) == _tars(ref)
    assert not list(out.glob("*.tmp"))
    assert m["shards"] == m0["shards"]
    # other settings are a different pack: every shard is redone
    m2 = shards.pack(synth, out, size=16, shard_size=SHARD, workers=1, progress=False)
    assert m2["shards_packed_this_run"] == 4
    assert next(shards.iter_shards(out))[1].shape == (16, 16, 3)


def test_killed_pack_resumes_to_identical_shards(synth, packed, tmp_path):
    ref, _ = packed
    out = tmp_path / "shards"
    env = {**os.environ, "PYTHONPATH": str(REPO), shards.DELAY_ENV: "0.1"}
    proc = subprocess.Popen([sys.executable, "-m", "kpnb.cli", "data", "pack", str(synth), "--out", str(out),
                             "--size", str(SIZE), "--shard-size", str(SHARD), "--workers", "2", "--no-progress"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not list(out.glob("shard-*.json")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "no shard finished within 60 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the pack and its workers: a session of their own
        proc.wait()
    n_done = len(list(out.glob("shard-*.json")))
    assert 1 <= n_done < 4 and not (out / "manifest.json").exists()
    m = shards.pack(synth, out, size=SIZE, shard_size=SHARD, workers=1, progress=False)
    assert m["shards_packed_this_run"] == 4 - n_done
    assert _tars(out) == _tars(ref)
    assert not list(out.glob("*.tmp"))


@pytest.fixture
def danbooru_tree(synth, tmp_path):
    """Danbooru2021's own layout from a few synthetic images, with one of each kind of problem."""
    root, kps = tmp_path / "danbooru2021", tmp_path / "keypoints"
    src = sorted((synth / "images").glob("*.png"), key=lambda p: int(p.stem))
    ids = {"12": 0, "99": 1, "1012": 2, "2345": 3, "40001": 4, "7": 5, "555": 6}
    posts = []
    for i, k in ids.items():
        b = f"{int(i) % 1000:04d}"
        if i == "99":  # only in original/, found through file_ext
            (root / "original" / b).mkdir(parents=True, exist_ok=True)
            shutil.copy(src[k], root / "original" / b / f"{i}.png")
        elif i != "7":
            (root / "512px" / b).mkdir(parents=True, exist_ok=True)
            Image.open(src[k]).convert("RGB").save(root / "512px" / b / f"{i}.jpg", quality=90)
        if i != "555":
            (kps / b).mkdir(parents=True, exist_ok=True)
            shutil.copy(synth / "keypoints" / f"{src[k].stem}.json", kps / b / f"{i}.json")
        if i != "7":
            posts.append({"id": i, "tags": [{"id": "1", "name": "1girl", "category": "0"}], "rating": "g",
                          "image_width": "640", "image_height": "480", "file_ext": "png" if i == "99" else "jpg"})
    (root / "512px" / "0001" / "40001.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    obj = json.loads((kps / "0345" / "2345.json").read_text())
    del obj["wrist_left"]
    (kps / "0345" / "2345.json").write_text(json.dumps(obj))
    (kps / "0001" / "12345.json").write_text("{}")  # in the wrong bucket
    (root / "metadata").mkdir()
    lines = [json.dumps(p) for p in posts]
    lines.insert(2, '{"id": "not closed')
    (root / "metadata" / "posts000000000000.json").write_text("\n".join(lines) + "\n")
    return root, kps


def test_danbooru_layout(danbooru_tree, tmp_path):
    root, kps = danbooru_tree
    src = danbooru.open_source(root, kps)
    assert src.layout == "danbooru2021" and src.keypoints_bucketed
    assert [k for _, k in src.image_roots] == ["512px", "original"]
    assert danbooru.open_source(root / "512px", kps).metadata_files == src.metadata_files  # SRC = 512px/ itself

    out = tmp_path / "shards"
    m = shards.pack(src, out, size=SIZE, shard_size=2, workers=1, progress=False)  # keypoints elsewhere
    got = {k: (im, pose, meta) for k, im, pose, meta in shards.iter_shards(out)}
    assert list(got) == ["12", "99", "1012"]  # numeric order; 7 has no image, 2345 and 40001 are bad
    assert [(s["first_id"], s["n"]) for s in m["shards"]] == [("7", 1), ("99", 2), ("2345", 0)]
    assert np.array_equal(got["12"][0], data.load_image(root / "512px" / "0012" / "12.jpg", SIZE))
    assert np.array_equal(got["99"][0], data.load_image(root / "original" / "0099" / "99.png", SIZE))
    assert np.array_equal(got["1012"][1], pose_formats.read_release_json(kps / "0012" / "1012.json").to_array())
    assert got["12"][2] == {"id": "12", "tag_names": ["1girl"], "rating": "g", "width": 640, "height": 480}

    found = {(p["kind"], Path(p["file"]).relative_to(tmp_path).as_posix()): p["reason"]
             for s in m["shards"] for p in s["problems"]}
    found.update({(p["kind"], p["file"].split(str(tmp_path) + "/")[-1]): p["reason"] for p in m["source_problems"]})
    assert set(found) == {
        ("no_image", "keypoints/0007/7.json"),
        ("bad_keypoints", "keypoints/0345/2345.json"),
        ("bad_images", "danbooru2021/512px/0001/40001.jpg"),
        ("bad_keypoints", "keypoints/0001/12345.json"),
        ("bad_metadata_lines", "danbooru2021/metadata/posts000000000000.json:3"),
    }
    assert "wrist_left" in found[("bad_keypoints", "keypoints/0345/2345.json")]
    assert "bucket" in found[("bad_keypoints", "keypoints/0001/12345.json")]
    assert "cannot read image" in found[("bad_images", "danbooru2021/512px/0001/40001.jpg")]
    assert m["problem_counts"] == {"bad_images": 1, "bad_keypoints": 2, "no_keypoints": 0, "no_image": 1,
                                   "bad_metadata_lines": 1}


def test_flat_keypoints_and_metadata_stream(danbooru_tree, tmp_path):
    root, kps = danbooru_tree
    flat = tmp_path / "flat_kp"
    flat.mkdir()
    for p in kps.glob("*/*.json"):
        shutil.copy(p, flat / p.name)
    src = danbooru.open_source(root, flat)
    problems = data.Problems()
    assert not src.keypoints_bucketed and src.keypoint_ids(problems) == ["7", "12", "99", "1012", "2345", "12345",
                                                                         "40001"]
    meta = dict(src.iter_meta({"12", "99"}, problems))
    assert sorted(meta) == ["12", "99"] and meta["99"]["file_ext"] == "png"
    assert len(problems.bad_metadata_lines) == 1  # the broken line could have been a wanted post
    (flat / "0012").mkdir()
    with pytest.raises(data.DataError, match="mixes"):
        danbooru.open_source(root, flat)


def test_truncated_shard(packed, tmp_path):
    ref, m = packed
    out = tmp_path / "shards"
    shutil.copytree(ref, out)
    bad = out / "shard-000001.tar"
    bad.write_bytes(bad.read_bytes()[:7000])
    with pytest.raises(shards.ShardError, match="shard-000001.tar"):
        list(shards.iter_shards(out))
    with pytest.raises(shards.ShardError, match="shard-000001.tar.*damaged tar"):
        list(shards.iter_shards(out, verify=False))
    skipped = []
    with pytest.warns(UserWarning, match="shard-000001.tar"):
        keys = [k for k, *_ in shards.iter_shards(out, skip_bad=True, skipped=skipped)]
    all_keys = [k for k, *_ in shards.iter_shards(ref)]
    assert keys == all_keys[:8] + all_keys[16:]
    assert [Path(f).name for f, _ in skipped] == ["shard-000001.tar"] and "manifest" in skipped[0][1]


def test_cli_argument_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["data", "pack", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "SRC" in capsys.readouterr().err
    assert cli.main(["data", "pack", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    (tmp_path / "d" / "512px" / "0001").mkdir(parents=True)
    assert cli.main(["data", "pack", str(tmp_path / "d"), "--out", str(tmp_path / "o")]) == 2
    assert "--keypoints" in capsys.readouterr().err
    with pytest.raises(data.DataError, match="no shard manifest"):
        next(shards.iter_shards(tmp_path / "o"))


def test_kpnb_layout_problems_match_load_candidates(tmp_path):
    from test_data import make_messy_dataset  # one of each kind of bad file

    root = make_messy_dataset(tmp_path / "ds")
    ref = data.load_candidates(root, 16, progress=False)
    m = shards.pack(root, tmp_path / "shards", size=16, shard_size=3, workers=1, progress=False)
    got = list(shards.iter_shards(tmp_path / "shards"))
    assert [k for k, *_ in got] == ref.ids == ["0", "5"]
    assert all(np.array_equal(g[1], im) for g, im in zip(got, ref.images))
    assert [g[3]["tag_names"] for g in got] == [m["tag_names"] for m in ref.meta] == [["1girl"], ["solo", "red_hair"]]
    problems = [(p["kind"], Path(p["file"]).name) for s in m["shards"] for p in s["problems"]]
    problems += [(p["kind"], Path(p["file"].rsplit(":", 1)[0]).name) for p in m["source_problems"]]
    want = [(k, Path(x if isinstance(x, str) else x[0]).name) for k, v in ref.problems.__dict__.items() for x in v]
    want = [(k, n.rsplit(":", 1)[0]) for k, n in want]
    assert sorted(problems) == sorted(want)
    assert m["n_no_metadata"] == 5  # of the 7 keypoint ids, only "0" and "5" have a metadata line


@pytest.mark.slow
def test_bench_data_measures_each_step(capsys):
    """kpnb bench data on two tiny pools: every step runs, with images/s, a peak memory and per-stage speed."""
    from kpnb.run import bench

    assert bench.main(["data", "--sizes", "12,24", "--size", "32", "--workers", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [r["n"] for r in res["pools"]] == [12, 24]
    for r in res["pools"]:
        for step in ("pack", "filter_and_subset"):
            assert r[step]["rc"] == 0 and r[step]["peak_rss_mb"] > 10 and r[step]["images_per_s"] > 0
        assert set(r["stage_images_per_s"]) == {"tags", "image", "pose"}
    assert set(res["peak_ratio"]) == {"pack", "filter_and_subset"}


def test_metadata_spilled_per_shard_for_the_shards_to_pack(tmp_path):
    # the pack streams metadata once into one file per shard still to pack; a repeated id's last record wins
    class Src:
        metadata_files = ["posts.json"]

        def iter_meta(self, wanted, problems):
            recs = [("1", {"id": "1", "tag_names": ["a"]}), ("3", {"id": "3", "tag_names": ["c"]}),
                    ("1", {"id": "1", "tag_names": ["a2"]}), ("9", {"id": "9"})]
            yield from ((k, r) for k, r in recs if k in wanted)

        def iter_labels(self, wanted):
            yield from [("1", {"label": "ok"}), ("4", {"label": "comic"})]

    plan = [["1", "2"], ["3", "4"]]
    no_meta = shards._spill_meta(Src(), plan, [0], tmp_path / "spill", data.Problems(), flush_every=1)
    assert no_meta == 2  # ids 2 and 4 have no metadata record; 9 is not in the plan
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == ["0.jsonl"]  # shard 1 is already packed
    meta = shards._read_spill(tmp_path / "spill" / "0.jsonl")
    assert meta == {"1": {"id": "1", "tag_names": ["a2"], "labels": {"label": "ok"}}}
