"""Notebook 01's filter run (kpnb.run.filter_report) on a pool of six hand-made candidates and three stages that
remove given ones."""
from pathlib import Path

import numpy as np

from kpnb.data import filtering, subset
from kpnb.data.folder import Candidates, Problems, split_of
from kpnb.run import filter_report as F

LABELS = ["single", "single", "comic", "single", "scenery", "single"]


def pool(labels=True):
    n = len(LABELS)
    rng = np.random.default_rng(0)
    lab = [{"label": name, "suitable": name == "single", "caption": f"c{i}", "attributes": {"i": i}}
           for i, name in enumerate(LABELS)]
    return Candidates(root=Path("."), ids=[f"id{i}" for i in range(n)],
                      images=rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8),
                      poses=rng.uniform(0, 1, (n, 17, 3)).astype(np.float32), meta=[{}] * n,
                      labels=lab if labels else None, problems=Problems(bad_images=[("x.png", "broken")]))


def stage(name, removed):
    def run(cands):
        keep = np.array([i not in removed for i in range(len(cands))])
        return filtering.StageResult(name, keep, ["" if k else f"{name}: out" for k in keep])
    return run


STAGES = [stage("tags", {2}), stage("image", {2, 4}), stage("last", {1})]


def test_the_chain_in_memory_its_tables_and_the_chain_without_its_last_stage():
    cands = pool()
    run = F.run_filter(cands, STAGES)
    assert run.index is None and run.report == run.view and run.report is not run.view
    np.testing.assert_array_equal(run.keep, [True, False, False, True, False, True])
    assert (run.report["n_kept"], run.report["precision"], run.report["recall"]) == (3, 1.0, 0.75)
    table = F.stage_table(run).splitlines()
    assert [line.split()[0] for line in table[1:4]] == ["tags", "image", "last"]
    assert table[2].split()[1:3] == ["2", "1"]  # image: removed alone, in the chain (2 was gone already)
    assert F.without_last_stage(run) == {"n_kept": 4, "precision": 1.0, "recall": 1.0}
    labels = F.label_table(cands, run).splitlines()
    assert labels[0].split() == ["label", "total", "tags", "image", "last", "left"]
    assert labels[1].split() == ["comic", "1", "1", "0", "0", "0"] and labels[3].split() == ["single", "4", "0", "0",
                                                                                                 "1", "3"]
    assert F.fmt(None) == "-" and F.fmt(0.5) == "0.500" and F.fmt(3) == "3"


def test_the_kept_images_are_split_by_their_id_and_saved_as_the_subset(tmp_path):
    cands = pool()
    kept = np.array([0, 1, 3, 5])
    counts = F.save_kept(tmp_path, cands, kept, val_frac=0.5, seed=1)
    want = {s: [f"id{i}" for i in kept if split_of(f"id{i}", 0.5, 1) == s] for s in ("train", "val")}
    assert counts == {s: len(v) for s, v in want.items()}
    for s in ("train", "val"):
        got = subset.load_subset(tmp_path, s)
        assert list(got["ids"]) == want[s]
        rows = [int(i[2:]) for i in want[s]]
        np.testing.assert_array_equal(got["images"], cands.images[rows])
        assert list(got["captions"]) == [f"c{i}" for i in rows]


def test_filter_metrics_put_the_chain_first_and_say_when_there_are_no_labels():
    run = F.run_filter(pool(), STAGES)
    run.report["without_clip.precision"] = 0.9
    train_poses = np.zeros((3, 17, 3), np.float32)
    train_poses[0, :, 2] = 2  # one whole, visible figure
    m = F.filter_metrics(run, {"train": 3, "val": 1}, train_poses, "synthetic", pool_in="memory")
    assert list(m)[:4] == ["n_candidates", "n_kept", "precision", "recall"]
    assert m["without_clip.precision"] == 0.9 and m["tags.removed_alone"] == 1
    assert (m["n_train"], m["n_val"], m["strict.n_train"], m["dataset"], m["pool_in"]) == (3, 1, 1, "synthetic",
                                                                                             "memory")
    assert m["strict.rule"] == filtering.STRICT_RULE and m["skipped.bad_images"] == 1 and "notes" not in m
    unlabelled = F.filter_metrics(F.run_filter(pool(labels=False), STAGES), {"train": 3, "val": 1}, train_poses,
                                  "data/x", pool_in="memory")
    assert unlabelled["precision"] is None and "no ground-truth labels" in unlabelled["notes"]
