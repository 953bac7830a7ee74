"""Notebook 05's run (kpnb.run.sampling_report): loading a run's models, the real poses as sampled, the printed
tables and the metrics with their keys, on hand-made numbers and the tiny diffusion run of conftest.py."""
import shutil

import numpy as np
import pytest

from kpnb.core import files as core_files
from kpnb.evaluate.generators import RealPoseRun
from kpnb.models.pose_net import PoseNet
from kpnb.poses.pose import MISSING, OUTSIDE, VISIBLE
from kpnb.run import folder as runs
from kpnb.run import sampling_report as S
from kpnb.run.folder import FURTHER, RunFiles


def test_no_run_models_without_a_trained_diffusion_model(tmp_path):
    runs.run_dir(tmp_path, "smoke")
    assert S.load_run_models(RunFiles(tmp_path), "f4", ["grid"], ["f8"]) is None


def test_run_models_add_the_best_mode_trained_further(tiny_ldm_run, tmp_path, monkeypatch):
    root = tmp_path / "run"
    shutil.copytree(tiny_ldm_run, root)
    core_files.write_metrics(root, "04_ldm_training", {"best_mode": "skeleton", "estimator.ceiling.pck@0.1": 0.9},
                             preset="smoke", seconds=1.0)
    shutil.copy(root / "subset" / "train.npz", root / "subset" / "val.npz")
    est = PoseNet(image_size=32, width=4)
    monkeypatch.setattr(S.estimator_training, "load_estimator", lambda folder: est)
    files = RunFiles(root)
    run = S.load_run_models(files, "f4", ["skeleton"], ["f8"])
    assert list(run.models) == list(run.generators) == ["skeleton"] and run.further_of is None
    assert run.estimator is est and run.ceiling == {"pck@0.1": 0.9} and len(run.val["poses"]) == 32
    assert run.generators["skeleton"] == (run.models["skeleton"], run.vq)
    shutil.copytree(files.ldm("f4", "skeleton"), files.ldm("f4", "skeleton", further=True), dirs_exist_ok=True)
    run = S.load_run_models(files, "f4", ["skeleton"], ["f8"])
    assert list(run.models) == ["skeleton", FURTHER] and run.further_of == "skeleton"
    assert S.best_label(FURTHER, run) == "skeleton (trained further)" and S.best_label("skeleton", run) == "skeleton"


def test_real_poses_are_completed_where_unlabelled_and_kept_where_labelled():
    rng = np.random.default_rng(0)
    train = np.zeros((20, 17, 3), np.float32)
    train[..., :2] = rng.uniform(0.2, 0.8, (20, 17, 2))
    train[..., 2] = VISIBLE
    real = S.real_poses_for(core_files.repo_root() / "data" / "real_poses" / "coco_persons.json", train)
    a, c = real.annotated, real.completed
    assert len(real.labels) == len(real.poses) == len(a) == 78
    unlabelled = a[..., 2] == MISSING
    assert unlabelled.any() and not (c[..., 2] == MISSING).any()
    np.testing.assert_array_equal(c[~unlabelled], a[~unlabelled])
    assert list(real.conditionings()) == ["completed", "as annotated"] and real.conditionings()["completed"] is c
    n_out = int((c[..., 2] == OUTSIDE).sum() - (a[..., 2] == OUTSIDE).sum())
    assert real.summary().startswith(f"78 real poses, {int(unlabelled.sum())} unlabelled joints completed ({n_out} ")


def real_runs():
    by_view = {"front.pck@0.1": 0.5, "front.n": 3, "back.pck@0.1": 0.25, "back.n": 1}
    scores = {"pck@0.1": 0.4, "pck@0.1_spread": 0.05, "pck@0.1.ratio": 0.8, "ap": 0.3, "n_images": 4.0,
              "sample_images_per_s": 9.0, "n_joints": 40.0}
    ceil = {"pck@0.05": 0.3, "pck@0.1": 0.5, "pck@0.1.arms": 0.6, "pck@0.2": 0.7, "ap": 0.6, "ar": 0.7, "n_joints": 40}
    none = np.zeros(0)
    return {"completed": RealPoseRun(none, ceil, none, scores, by_view),
            "as annotated": RealPoseRun(none, {**ceil, "pck@0.1": 0.45}, none, {**scores, "pck@0.1": 0.2}, {})}


def real_set():
    a = np.zeros((4, 17, 3), np.float32)
    a[..., 2] = VISIBLE
    a[0, :3, 2] = MISSING
    return S.RealPoses(["p"] * 4, [None] * 4, a, a)


def test_real_pose_metrics_against_the_heldout_pck():
    m = S.real_pose_metrics(real_set(), real_runs(), 0.5, {"front.pck@0.1": 0.6, "front.n": 4}, seeds=(0, 1))
    assert m["real_poses.n"] == 4 and m["real_poses.ratio_to_heldout"] == pytest.approx(0.8)
    assert m["real_poses.pck@0.1"] == 0.4
    assert "real_poses.n_images" not in m and "real_poses.sample_images_per_s" not in m
    assert {k for k in m if k.startswith("real_poses.ceiling.")} == {
        "real_poses.ceiling.pck@0.05", "real_poses.ceiling.pck@0.1", "real_poses.ceiling.pck@0.1.arms",
        "real_poses.ceiling.pck@0.2", "real_poses.ceiling.ap"}
    assert m["real_poses.n_completed_joints"] == 3 and m["real_poses.seeds"] == [0, 1]
    assert m["real_poses.as_annotated.ratio_to_heldout"] == pytest.approx(0.4)
    assert m["real_poses.as_annotated.ceiling.pck@0.1"] == 0.45
    assert m["by_view.heldout.front.n"] == 4 and m["by_view.real_poses.back.pck@0.1"] == 0.25 and "notes" not in m
    zero = S.real_pose_metrics(real_set(), real_runs(), 0.0, {}, seeds=(0,))
    assert zero["real_poses.ratio_to_heldout"] is None and zero["real_poses.as_annotated.ratio_to_heldout"] is None
    assert "held-out PCK@0.1 is 0" in zero["notes"]


def test_real_pose_report_lists_the_rows_views_and_ratios():
    text = S.real_pose_report("grid", {"pck@0.1": 0.5}, real_runs(), {"front.pck@0.1": 0.6, "front.n": 4}, (0, 1))
    lines = text.splitlines()
    assert [line[:40].strip() for line in lines[1:6]] == [
        "grid on held-out poses", "ceiling on renders, completed", "grid on the real poses, completed",
        "ceiling on renders, as annotated", "grid on the real poses, as annotated"]
    assert lines[6] == ("PCK@0.1 by view (poses): front held-out 0.600 (4), real 0.500 (3); "
                        "back held-out nan (0), real 0.250 (1)")
    assert "real / held-out = 0.80 (target >= 0.8)" in lines[7] and "real / held-out = 0.40" in lines[8]


def test_heldout_quality_and_sweep_metrics_keep_their_keys():
    run = S.RunModels({"grid": None, FURTHER: None}, None, {}, "grid", None,
                      {"pck@0.05": 0.2, "pck@0.1": 0.4, "pck@0.2": 0.6, "ap": 0.5, "ap@0.5": 0.7}, {}, {})
    m = S.heldout_metrics(run, "grid", {"grid": {"pck@0.1": 0.3}, "f8": {"ap": 0.1}}, 16)
    assert m == {"best_mode": "grid", "n_eval": 16, f"{FURTHER}.mode": "grid", "grid.pck@0.1": 0.3, "f8.ap": 0.1,
                 "pck_ceiling@0.05": 0.2, "pck_ceiling@0.1": 0.4, "pck_ceiling@0.2": 0.6, "ap_ceiling": 0.5,
                 "ap@0.5_ceiling": 0.7, "ap@0.75_ceiling": None}

    class Dist:
        name, n_real = "domain CLIP", 30

    floors = S.FidFloors({"f4": 2.0, "f8": None, "f16": 5.0}, {"fid": 1.0, "kid": 0.01}, None)
    q = S.quality_metrics({"grid": {"fid": 4.0, "fid_spread": 0.5}}, Dist(), 8, (0, 1), floors,
                          {"ratio": 0.9}, {"grid": 6.0})
    assert q == {"grid.fid": 4.0, "grid.fid_spread": 0.5, "fid_features": "domain CLIP", "fid_n_real": 30,
                 "fid_n_fake": 8, "fid_seeds": [0, 1], "fid_floor.f4": 2.0, "fid_real_same_n": 1.0,
                 "kid_real_same_n": 0.01, "fid_recon_same_n": None, "diversity.ratio": 0.9, "grid.head_fid": 6.0}
    assert S.sweep_metrics({0.0: {"pck@0.1": 0.1, "ap": 0.2, "fid": 3.0, "kid": 0.1}}) == {
        "guidance_sweep.0.0.pck@0.1": 0.1, "guidance_sweep.0.0.fid": 3.0, "guidance_sweep.0.0.kid": 0.1}
    assert S.released_metrics("a.ckpt", {"steps": 50, "eta": 1.0}) == {
        "original.checkpoint": "a.ckpt", "original.steps": 50, "original.eta": 1.0}


def test_fid_table_shows_the_floors_and_the_ratios_to_them():
    floors = S.FidFloors({"f4": 2.0, "f8": None, "f16": 5.0}, {"fid": 1.0, "kid": 0.01}, {"fid": 4.0, "kid": 0.02})
    lines = S.fid_table({"grid": {"fid": 8.0, "fid_spread": 0.5, "kid": 0.1, "kid_spread": 0.01}}, floors).splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["f4", "f16", "real,", "f4", "grid"]
    assert lines[-1].split() == ["grid", "8.000", "0.500", "0.1000", "0.0100", "4.00", "2.00"]


def test_fid_floors_score_as_many_training_images_and_their_f4_reconstructions(tmp_path, monkeypatch):
    runs.run_dir(tmp_path, "smoke")
    core_files.write_metrics(tmp_path, "03_vq_training", {"f4.fid": 3.0, "f16.fid": 9.0}, preset="smoke", seconds=1)
    scored = []

    class Dist:
        def score(self, images, seed=0):
            scored.append(np.asarray(images))
            return {"fid": float(len(scored)), "kid": 0.0}

    monkeypatch.setattr(S.vq_eval, "reconstruct", lambda vq, images: (255 - images, None))
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    run = S.RunModels({}, "the f4 VQ", {}, None, None, {}, {"images": images}, {})
    f4 = S.fid_floors(RunFiles(tmp_path), Dist(), run, "f4", 4)
    assert f4.reconstructions == {"f4": 3.0, "f8": None, "f16": 9.0}
    assert f4.real_same_n["fid"] == 2.0 and f4.recon_same_n["fid"] == 1.0  # the reconstructions were scored first
    np.testing.assert_array_equal(scored[0], 255 - images[:4])
    np.testing.assert_array_equal(scored[1], images[:4])
    assert S.fid_floors(RunFiles(tmp_path), Dist(), run, "f8", 4).recon_same_n is None


def test_the_pose_editor_generates_four_samples_of_the_model(monkeypatch):
    from kpnb.poses.pose import Pose

    calls = []

    def fake_sample(model, vq, poses, seed, **kw):
        calls.append((model, vq, poses.shape, seed, kw))
        return np.zeros((len(poses), 8, 8, 3), np.uint8)

    monkeypatch.setattr(S, "sample_images", fake_sample)
    p = np.zeros((17, 3), np.float32)
    p[:, :2], p[:, 2] = 0.5, VISIBLE
    editor = S.pose_editor({"a": Pose.from_array(p)}, "model", "vq", {"steps": 3})
    editor.generate_button.click()
    assert calls == [("model", "vq", (4, 17, 3), 0, {"steps": 3})] and len(editor.samples) == 4
