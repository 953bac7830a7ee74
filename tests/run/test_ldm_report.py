"""Notebook 04's comparisons (kpnb.run.ldm_report) on a tiny untrained diffusion model, a VQ stand-in and an
untrained pose estimator; training is replaced by returning that model."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_generators import DDIM, FakeDistance, FakeVQ, estimator, poses, tiny_ldm

from kpnb.data import filtering
from kpnb.evaluate import pose as pose_eval
from kpnb.poses.pose import OUTSIDE
from kpnb.run import ldm_report as L
from kpnb.run.folder import FURTHER
from kpnb.train.ldm import validation_loss


def scoring(n=6):
    z = torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images = np.random.default_rng(0).integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    return L.Scoring(FakeVQ(), estimator(), {"images": images, "poses": poses(n, seed=1)}, z * 0.5, DDIM)


def test_validation_losses_with_the_pose_and_with_the_null_pose():
    m, s = tiny_ldm(), scoring()
    got = L.validation_losses(m, s)
    assert got == {"val_loss": validation_loss(m, s.latents, s.val["poses"], seed=0),
                   "val_loss_uncond": validation_loss(m, s.latents, s.val["poses"], seed=0, uncond=True)}
    assert got["val_loss"] != got["val_loss_uncond"]


def test_the_best_mode_is_chosen_on_the_last_heldout_poses():
    m, s = tiny_ldm(), scoring()
    got = L.selection_pck({"a": m}, s, 2)
    want = pose_eval.pose_fidelity(m, s.vq, s.estimator, s.val["poses"][4:], seed=0, **DDIM)[1]["pck@0.1"]
    assert got == {"a": want}


def test_the_overfitting_check_scores_heldout_and_training_latents(monkeypatch):
    m, s, dist = tiny_ldm(), scoring(), FakeDistance()
    monkeypatch.setattr(L.stages, "distance_for_run", lambda root, cfg, images: dist)
    z_train = np.random.default_rng(2).normal(size=(10, 2, 3, 8, 8)).astype(np.float32)
    train_poses = poses(10, seed=3)
    check = L.overfitting_check("run", {"diffusion": {"batch_size": 4}}, s, z_train, 2.0, train_poses, n_fid=4)
    assert (check.n_fid, check.n_train, check.batch_size) == (4, 10, 4)
    np.testing.assert_array_equal(check.train_latents.numpy(), z_train[:6, 0] * 2.0)  # unflipped, as many as held out
    point = check(m, 5)
    assert point["epochs"] == 2.0 and dist.calls == [0]
    assert point["val_loss"] == validation_loss(m, s.latents, s.val["poses"], seed=0)
    assert point["train_loss"] == validation_loss(m, check.train_latents, train_poses[:6], seed=0)
    assert L.curve_metrics([{"step": 5, **point}], check) == {
        "curve.n_fid": 4, "curve.n_train": 10, "curve.step": [5], "curve.epochs": [2.0],
        "curve.val_loss": [point["val_loss"]], "curve.train_loss": [point["train_loss"]], "curve.fid": [point["fid"]]}
    assert L.curve_metrics([], check) == {} and L.curve_metrics([{"step": 5}], None) == {}
    table = L.curve_table([{"step": 5, **point}], 4).splitlines()
    assert table[0].split()[-2:] == ["FID", "(n=4)"] and table[1].split()[:2] == ["5", "2.0"]


def test_strict_comparison_scores_whole_figures_apart(monkeypatch):
    loose, strict, s = tiny_ldm(), tiny_ldm(), scoring()
    with torch.no_grad():
        next(strict.parameters()).add_(1.0)
    s.val["poses"][1, 3] = (1.2, 0.5, OUTSIDE)  # one held-out figure is not whole
    trained = []

    def fake_train(root, cfg, spec, mode, **kw):
        trained.append((spec, mode, kw))
        return strict, SimpleNamespace(step=7, seconds=3.0)

    monkeypatch.setattr(L.stages, "train_ldm", fake_train)
    train_poses = poses(5, seed=4)
    train_poses[0, 0, 2] = OUTSIDE
    got = L.strict_comparison("run", {"diffusion": {"n_eval": 4}}, "f4", "grid", loose, s,
                              train_poses)
    assert trained == [("f4", "grid", {"subset": "strict"})]
    assert {k: got[k] for k in ("mode", "n_train.loose", "n_train.strict", "steps", "train_seconds", "n_eval",
                                "n_eval.whole")} == {"mode": "grid", "n_train.loose": 5, "n_train.strict": 4,
                                                     "steps": 7, "train_seconds": 3.0, "n_eval": 4, "n_eval.whole": 3}
    assert got["rule"] == filtering.STRICT_RULE
    held = s.val["poses"][:4]
    for name, m in (("loose", loose), ("strict", strict)):
        images, sc = pose_eval.pose_fidelity(m, s.vq, s.estimator, held, seed=0, **DDIM)
        found = L.predict(s.estimator, images)
        assert got[f"{name}.pck@0.1"] == sc["pck@0.1"]
        assert got[f"{name}.pck@0.1.partial"] == pose_eval.pck(found[[1]], held[[1]])["pck@0.1"]
        assert got[f"{name}.val_loss"] == validation_loss(m, s.latents, s.val["poses"], seed=0)
    lines = L.strict_table(got).splitlines()
    assert [line.split()[:2] for line in lines[1:]] == [["loose", "5"], ["strict", "4"]]
    s.val["poses"][1, 3] = s.val["poses"][0, 3]  # every figure whole: no partial number
    assert L.strict_comparison("run", {"diffusion": {"n_eval": 4}}, "f4", "grid", loose, s,
                               train_poses)["loose.pck@0.1.partial"] is None


def test_train_on_spec_reports_the_latent_shape_and_its_heldout_loss(monkeypatch, tmp_path):
    m, s = tiny_ldm(), scoring()
    monkeypatch.setattr(L.stages, "train_ldm", lambda *a, **kw: (m, SimpleNamespace(images_per_s=5.0, seconds=2.0,
                                                                                     step=6)))
    z = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(L, "load_vq", lambda folder: "the f8 VQ")
    monkeypatch.setattr(L, "encode_latents", lambda vq, images: z)
    got = L.train_on_spec(tmp_path, {}, "f8", "grid", s.val)
    assert got == {"mode": "grid", "latent_shape": "3x8x8", "train_images_per_s": 5.0, "train_seconds": 2.0,
                   "train_steps": 6, "val_loss": validation_loss(m, z * m.scale_factor, s.val["poses"], seed=0)}


def test_model_metrics_and_the_total_training_time():
    r = lambda secs, hist: SimpleNamespace(images_per_s=10.0, seconds=secs, step=4, history=hist)  # noqa: E731
    results = {"grid": r(3.0, [{"loss": float(i)} for i in range(12)]), "tokens": r(4.0, [{"lr": 1.0}]),
               FURTHER: r(5.0, [])}
    losses = {"grid": {"val_loss": 0.5}, FURTHER: {"val_loss": 0.4}}
    m = L.model_metrics(results, losses)
    assert m == {"grid.train_images_per_s": 10.0, "grid.train_seconds": 3.0, "grid.train_steps": 4,
                 "grid.final_loss": pytest.approx(6.5), "grid.val_loss": 0.5,
                 f"{FURTHER}.train_images_per_s": 10.0, f"{FURTHER}.train_seconds": 5.0, f"{FURTHER}.train_steps": 4,
                 f"{FURTHER}.final_loss": None, f"{FURTHER}.val_loss": 0.4}
    # the longer run's seconds include its equal-budget part: only the 2 s it added count
    assert L.total_train_seconds(results, ["grid", "tokens"], "grid", {"f8": {"train_seconds": 1.0}},
                                 {"train_seconds": 0.5}) == 10.5
    del results[FURTHER]
    assert L.total_train_seconds(results, ["grid", "tokens"], "grid", {}, {}) == 7.0


def test_unet_stats_of_the_model():
    from kpnb.diffusion.ldm import model_stats

    m = tiny_ldm()
    got = L.unet_stats(m, (8, 8), poses(1))
    want = model_stats(m.unet, [torch.zeros(1, m.unet.cfg.in_channels, 8, 8), torch.zeros(1, dtype=torch.long),
                                m.cond(torch.as_tensor(poses(1))).context])
    assert got == {"unet_params_M": want["params_M"], "unet_forward_gflop_per_image": want["gflop_per_sample"]}
    assert got["unet_params_M"] > 0
