"""kpnb.run.stages: the longer run in scored stretches, a diffusion model on the strict part of the subset."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from kpnb import synth
from kpnb.core import runtime, settings
from kpnb.poses import analysis as pose_analysis
from kpnb.run import stages
from kpnb.run.folder import RunFiles
from kpnb.train import checkpoints


@pytest.fixture
def run(tiny_ldm_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(tiny_ldm_run, root)
    return root


@pytest.fixture
def one_thread():
    """A fixed-thread CPU runtime; torch's process-wide thread count put back afterwards."""
    before = torch.get_num_threads()
    yield runtime.Runtime.from_settings({"device": "cpu", "precision": "fp32", "compile": False, "workers": 0,
                                         "threads": 1})
    torch.set_num_threads(before)


def test_curve_stops():
    assert stages.curve_stops({"steps": 500, "best_steps": 2000, "curve_points": 3}) == [1000, 1500, 2000]
    assert stages.curve_stops({"steps": 6, "best_steps": 8, "curve_points": 3}) == [7, 8]  # no stop twice
    assert stages.curve_stops({"steps": 10, "best_steps": 10, "curve_points": 3}) == []


def test_train_further_in_stretches_is_one_run_and_a_rerun_reads_the_points(run, tmp_path, one_thread):
    cfg = settings.run_config(run)
    cfg["diffusion"] = {**cfg["diffusion"], "steps": 6, "best_steps": 10, "curve_points": 2}
    # a fixed thread count, not the "auto" runtime an earlier in-process notebook may have left current: that
    # refits threads to the free cores, a reduction split differently rounds differently, and Adam grows the
    # rounding to ~1e-4 on small weights
    rt = one_thread
    calls = []

    def score(model, step):
        calls.append(step)
        return {"w": float(next(model.parameters()).double().sum())}

    model, res, points = stages.train_further(run, cfg, "f4", "skeleton", score=score, runtime=rt)
    assert calls == [8, 10] and [p["step"] for p in points] == [8, 10] and res.step == 10
    # one stretch from the same equal-budget checkpoint gives the same weights
    one = tmp_path / "one"
    shutil.copytree(run, one)
    shutil.rmtree(RunFiles(one).ldm("f4", "skeleton", further=True))
    m1, _ = stages.train_ldm(one, cfg, "f4", "skeleton", further=True, runtime=rt)
    for a, b in zip(model.state_dict().values(), m1.state_dict().values()):
        assert torch.equal(a, b)
    # a rerun trains nothing and scores nothing: the points come from curve.json
    calls.clear()
    _, res2, points2 = stages.train_further(run, cfg, "f4", "skeleton", score=score)
    assert calls == [] and points2 == points and res2.step == 10
    saved = json.loads((RunFiles(run).ldm("f4", "skeleton", further=True) / "curve.json").read_text())
    assert [p["step"] for p in saved] == [8, 10]


def test_strict_subset_model_trains_on_whole_figures_only(run):
    cfg = settings.run_config(run)
    train = stages.data.load_subset(run, "train")
    rows = stages.subset_rows(train["poses"], "strict")
    assert 0 < len(rows) < len(train["poses"])  # the renders include crops and hidden ears
    _, res = stages.train_ldm(run, cfg, "f4", "skeleton", subset="strict")
    folder = RunFiles(run).ldm("f4", "skeleton", subset="strict")
    assert folder.name == "ldm-f4-skeleton-strict" and res.step == cfg["diffusion"]["steps"]
    n_train = len(stages.training_rows(train["poses"], cfg["diffusion"], "strict"))   # with the view repeats
    assert checkpoints.read_checkpoint_info(checkpoints.latest_checkpoint(folder))["config"]["n_train"] == n_train
    with pytest.raises(ValueError, match="unknown training subset"):
        stages.subset_rows(train["poses"], "loose")


def test_training_rows_repeat_the_figures_of_the_named_views():
    rng = np.random.default_rng(0)
    poses = np.stack([synth.characters.sample_pose(rng)[0].to_array() for _ in range(200)])
    views = pose_analysis.pose_views(poses)
    assert {"front", "side", "back"} <= set(views)
    rows = stages.training_rows(poses, {"view_repeat": {"side": 2, "back": 3}})
    counts = np.bincount(rows, minlength=len(poses))
    assert (counts == np.select([views == "side", views == "back"], [2, 3], 1)).all()
    assert (stages.training_rows(poses, {"view_repeat": {}}) == np.arange(len(poses))).all()
    assert (stages.training_rows(poses, {}) == np.arange(len(poses))).all()
    strict = stages.training_rows(poses, {"view_repeat": {"back": 3}}, "strict")
    assert set(strict) == set(stages.subset_rows(poses, "strict"))
    for bad in ({"behind": 2}, {"back": 0}, {"back": 1.5}, {"back": True}):
        with pytest.raises(ValueError, match="diffusion.view_repeat"):
            stages.training_rows(poses, {"view_repeat": bad})
