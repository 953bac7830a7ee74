"""PCK and COCO keypoint AP on hand-made cases (docs/metrics.md), and the estimator end to end on a few renders."""
import numpy as np
import pytest
import torch

from kpnb.evaluate import pose as E
from kpnb.models import pose_net
from kpnb.poses.pose import HIDDEN, MISSING, OUTSIDE, VISIBLE
from kpnb.synth import renders
from kpnb.train import estimator as estimator_training


def box_pose(w=0.4, h=0.2):
    """17 visible joints spread over a w x h box at (0.3, 0.4): max(w, h) = w."""
    t = np.linspace(0, 1, 17, dtype=np.float32)
    p = np.zeros((17, 3), np.float32)
    p[:, 0] = 0.3 + w * t
    p[:, 1] = 0.4 + h * (1 - t)
    p[:, 2] = VISIBLE
    return p


def test_perfect_is_one_and_keys():
    tgt = np.stack([box_pose(), box_pose(0.3, 0.5)])
    out = E.pck(tgt[..., :2], tgt)
    for a in ("0.05", "0.1", "0.2"):
        assert out[f"pck@{a}"] == 1.0
        for g in ("head", "arms", "legs"):
            assert out[f"pck@{a}.{g}"] == 1.0
    assert out["n_images"] == 2 and out["n_joints"] == 34


def test_known_shift():
    tgt = box_pose()[None]                      # max(w, h) = 0.4
    pred = tgt[..., :2].copy()
    pred[0, :, 0] += 0.03                       # 0.03: beyond 0.05 * 0.4 = 0.02, within 0.1 * 0.4 = 0.04
    out = E.pck(pred, tgt)
    assert out["pck@0.05"] == 0.0 and out["pck@0.1"] == 1.0 and out["pck@0.2"] == 1.0
    pred = tgt[..., :2].copy()
    pred[0, 9:, 1] -= 0.05                      # 8 of 17 joints (wrists, hips, knees, ankles) off by 0.05
    out = E.pck(pred, tgt)
    assert out["pck@0.1"] == pytest.approx(9 / 17) and out["pck@0.2"] == 1.0
    assert out["pck@0.1.head"] == 1.0 and out["pck@0.1.legs"] == 0.0
    assert out["pck@0.1.arms"] == pytest.approx(4 / 6)   # shoulders, elbows right; wrists (9, 10) wrong


def test_only_visible_in_frame_joints_count_but_hidden_ones_size_the_box():
    tgt = box_pose()[None].copy()
    pred = tgt[..., :2].copy()
    tgt[0, 1, 2] = HIDDEN
    tgt[0, 2, 2] = MISSING
    tgt[0, 3, :] = (1.4, 0.5, OUTSIDE)
    pred[0, 1:4] = 5.0                          # garbage where the joints do not count
    out = E.pck(pred, tgt)
    assert out["pck@0.05"] == 1.0 and out["n_joints"] == 14
    # a hidden joint far away widens the box: a shift of 0.03 becomes correct at 0.05
    tgt2 = box_pose()[None].copy()
    tgt2[0, 0, :] = (0.3 - 0.4, 0.4, HIDDEN)   # w: 0.4 -> 0.8, threshold 0.05 * 0.8 = 0.04
    pred2 = tgt2[..., :2].copy()
    pred2[0, :, 0] += 0.03
    assert E.pck(pred2, tgt2)["pck@0.05"] == 1.0


def test_mean_over_joints_then_images_and_found_flag():
    a = box_pose()
    b = box_pose()
    a[2:, 2] = MISSING                          # image a: 2 counted joints
    pred = np.stack([a[:, :2], b[:, :2]]).copy()
    pred[0, 0, 0] += 0.3                        # a: 1 of 2 right; b: 17 of 17
    out = E.pck(pred, np.stack([a, b]))
    assert out["pck@0.1"] == pytest.approx((0.5 + 1.0) / 2)   # not the joint-pooled 18/19
    p3 = np.concatenate([np.stack([b[:, :2]]), np.full((1, 17, 1), VISIBLE, np.float32)], -1)
    p3[0, :4, 2] = OUTSIDE                      # the estimator says these are not in the image
    assert E.pck(p3, b[None])["pck@0.1"] == pytest.approx(13 / 17)
    with pytest.raises(ValueError, match="pred must be"):
        E.pck(np.zeros((2, 17, 2)), b[None])


COCO_SIGMAS = np.array([.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107, .087, .087,
                        .089, .089])


def test_ap_of_one_pose_follows_its_oks_by_hand():
    """One pose, every joint moved by 3 px in a 256 px frame: OKS = mean_j exp(-d^2 / (2 area (2 sigma_j)^2)),
    area = the joints' bbox (0.4 x 0.2 of the frame), and with one detection for one pose AP is the share of
    the ten thresholds 0.50:0.05:0.95 that OKS reaches."""
    tgt = box_pose()[None]
    pred = tgt[..., :2] + 3 / 256
    area = (0.4 * 256) * (0.2 * 256)
    d2 = 2 * 3.0 ** 2
    oks = float(np.mean(np.exp(-d2 / (2 * area * (2 * COCO_SIGMAS) ** 2))))
    out = E.pose_ap(pred, tgt)
    assert out["oks"] == pytest.approx(oks, rel=1e-4)
    assert 0.5 < oks < 0.95  # the test means something: some thresholds met, some not
    assert out["ap"] == pytest.approx(np.mean(oks >= np.arange(0.5, 0.951, 0.05)), abs=1e-6)
    assert E.pose_ap(tgt[..., :2], tgt)["ap"] == pytest.approx(1.0)


def test_ap_counts_hidden_joints_not_outside_ones_and_ranks_by_score():
    tgt = box_pose()[None]
    tgt[0, 3, 2] = HIDDEN
    tgt[0, 16, 2] = OUTSIDE
    pred = tgt[..., :2].copy()
    pred[0, 16] = (0.95, 0.05)          # an outside joint is not scored
    assert E.pose_ap(pred, tgt)["ap"] == pytest.approx(1.0)
    pred[0, 3] += 0.2                   # a hidden joint is
    assert E.pose_ap(pred, tgt)["oks"] < 0.95
    good, bad = box_pose(), box_pose()
    two = np.stack([good, bad])
    guess = two[..., :2].copy()
    guess[1] += 0.3                     # the second detection is far off
    right = E.pose_ap(guess, two, scores=[0.9, 0.1])["ap"]
    wrong = E.pose_ap(guess, two, scores=[0.1, 0.9])["ap"]
    # COCO interpolates precision at 101 recall points: recall 0.5 at precision 1 covers 51 of them
    assert right == pytest.approx(51 / 101) and wrong < right   # a confident miss costs precision
    with pytest.raises(ValueError, match="scores"):
        E.pose_ap(guess, two, scores=[1.0])


def test_soft_argmax_reads_the_peak():
    hm = torch.full((1, 2, 16, 16), -30.0)
    hm[0, 0, 4, 10] = 30.0
    hm[0, 1, 15, 0] = 30.0
    xy = pose_net.soft_argmax(hm)[0]
    torch.testing.assert_close(xy, torch.tensor([[10.5 / 16, 4.5 / 16], [0.5 / 16, 15.5 / 16]]))


def test_estimator_on_a_few_renders(tmp_path):
    imgs, poses = renders.render_truth(6, seed=5, image_size=32, render_size=64)
    assert imgs.shape == (6, 32, 32, 3) and imgs.dtype == np.uint8 and poses.shape == (6, 17, 3)
    assert E.pck(poses[..., :2], poses)["pck@0.05"] == 1.0
    cfg = {"steps": 3, "batch_size": 4, "lr": 2e-3, "width": 8, "ckpt_every": 3, "seed": 0}
    model, res = estimator_training.train_estimator(imgs, poses, cfg, tmp_path / "est", progress=False)
    assert res.step == 3 and np.isfinite(res.history[-1]["loss"])
    pred = pose_net.predict(model, imgs)
    assert pred.shape == (6, 17, 3) and pred.dtype == np.float32
    assert set(np.unique(pred[..., 2])) <= {OUTSIDE, HIDDEN, VISIBLE}
    assert np.all((pred[..., :2] > 0) & (pred[..., :2] < 1))
    # other image sizes are resized to the network's input
    assert pose_net.predict(model, np.zeros((2, 48, 48, 3), np.uint8)).shape == (2, 17, 3)
    model2, res2 = estimator_training.train_estimator(imgs, poses, {**cfg, "steps": 4}, tmp_path / "est", progress=False)
    assert res2.start_step == 3 and res2.step == 4  # resumed with more steps
    again = estimator_training.load_estimator(tmp_path / "est")
    pred = pose_net.predict(model2, imgs)  # the same weights as the checkpoint of step 4
    np.testing.assert_allclose(pose_net.predict(again, imgs), pred, atol=1e-5)
    c = E.ceiling(model, imgs, poses)
    assert 0.0 <= c["pck@0.1"] <= 1.0 and c["n_images"] == 6
    assert 0.0 <= c["ap"] <= 1.0 and c["n_images"] == 6
    scored, scores = pose_net.predict(model2, imgs, with_scores=True)
    np.testing.assert_array_equal(scored, pred)
    assert scores.shape == (6,) and np.all((scores > 0) & (scores <= 1))


def test_partial_figures_leave_joints_out():
    whole_imgs, whole = renders.render_truth(12, seed=5, image_size=32, render_size=64)
    part_imgs, part = renders.render_truth(12, seed=5, image_size=32, render_size=64, partial=1.0)
    assert not (whole[..., 2] == MISSING).any()
    missing = part[..., 2] == MISSING
    assert 0.1 < missing.mean() < 0.45 and missing.any(1).sum() >= 10   # about PARTIAL_DROP of the joints
    assert np.all(part[missing][:, :2] == 0)
    kept = ~missing & (part[..., 2] != HIDDEN)
    np.testing.assert_array_equal(part[kept][:, :2], whole[kept][:, :2])  # the same figures, joints left out
    assert (part_imgs != whole_imgs).any()
    _, half = renders.render_truth(12, seed=5, image_size=32, render_size=64, partial=0.5)
    assert 0 < (half[..., 2] == MISSING).any(1).sum() < 12


def test_keeper_is_trained_apart_from_the_judge(tmp_path):
    """fit_keeper refuses the judge's render seeds, and otherwise trains on renders of its own seed."""
    cfg = {"steps": 2, "batch_size": 4, "lr": 2e-3, "width": 8, "image_size": 32, "n_train": 4, "n_val": 4,
           "train_seed": 1, "val_seed": 2, "ckpt_every": 2, "seed": 0, "partial": 0.5}
    for seed in (1, 2):
        with pytest.raises(ValueError, match="keeper_seed"):
            estimator_training.fit_keeper(cfg, seed, tmp_path / f"k{seed}", progress=False)
    keeper, info = estimator_training.fit_keeper(cfg, 11, tmp_path / "k", progress=False)
    assert info["steps"] == 2 and 0.0 <= info["ceiling.pck@0.1"] <= 1.0
    assert keeper.image_size == 32
    # a budget of its own (clip.keeper_steps / keeper_n_train)
    _, info = estimator_training.fit_keeper(cfg, 11, tmp_path / "k3", steps=3, n_train=6, progress=False)
    assert info["steps"] == 3 and info["n_train"] == 6


def test_estimator_training_is_reproducible(tmp_path):
    # the initial weights come from the seed, not from whatever the process's random state was
    imgs, poses = renders.render_truth(4, seed=5, image_size=32, render_size=64)
    cfg = {"steps": 2, "batch_size": 4, "lr": 2e-3, "width": 8, "ckpt_every": 2, "seed": 3}
    torch.manual_seed(1)
    a, _ = estimator_training.train_estimator(imgs, poses, cfg, tmp_path / "a", progress=False)
    torch.manual_seed(2)
    b, _ = estimator_training.train_estimator(imgs, poses, cfg, tmp_path / "b", progress=False)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_pck_on_real_poses_ignores_missing_joints():
    """The real-pose set has joints COCO did not label (MISSING, stored at (0, 0)): they are neither scored
    nor part of the box that sets the scale."""
    from kpnb.data import real_poses

    _, poses = real_poses.real_pose_set()
    tgt = np.stack([p.to_array() for p in poses if (p.vis == MISSING).any()])
    assert len(tgt) >= 10
    missing = tgt[..., 2] == MISSING
    pred = tgt[..., :2].copy()
    pred[missing] = (0.9, 0.1)                   # far from where a missing joint is stored
    assert E.pck(pred, tgt)["pck@0.05"] == 1.0
    out = E.pck(pred, tgt)
    assert out["n_joints"] == int((tgt[..., 2] == VISIBLE).sum())
    # every prediction 1.2 x the threshold off: wrong, unless (0, 0) of a missing joint widened the box
    in_frame = (tgt[..., 2] == VISIBLE) | (tgt[..., 2] == HIDDEN)
    lo = np.where(in_frame[..., None], tgt[..., :2], np.inf).min(1)
    hi = np.where(in_frame[..., None], tgt[..., :2], -np.inf).max(1)
    size = (hi - lo).max(-1)
    shifted = tgt[..., :2] + np.stack([1.2 * 0.1 * size, np.zeros_like(size)], -1)[:, None]
    assert E.pck(shifted, tgt)["pck@0.1"] == 0.0


def test_render_poses_draws_the_given_poses_reproducibly():
    from kpnb.data import real_poses

    _, poses = real_poses.real_pose_set()
    arr = np.stack([p.to_array() for p in poses[:3]])
    a = renders.render_poses(arr, seed=0, image_size=32, render_size=64)
    assert a.shape == (3, 32, 32, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, renders.render_poses(arr, seed=0, image_size=32, render_size=64))
    assert not np.array_equal(a, renders.render_poses(arr, seed=1, image_size=32, render_size=64))  # other characters
    moved = arr.copy()
    moved[0, :, 0] = np.where(moved[0, :, 2] != MISSING, moved[0, :, 0] - 0.1, 0)
    b = renders.render_poses(moved, seed=0, image_size=32, render_size=64)
    assert not np.array_equal(a[0], b[0]) and np.array_equal(a[1:], b[1:])   # the pose is what is drawn


def test_pck_by_view_is_pck_within_each_view():
    rng = np.random.default_rng(0)
    target = np.concatenate([rng.uniform(0.2, 0.8, (6, 17, 2)), np.full((6, 17, 1), VISIBLE)], -1)
    pred = target[..., :2] + rng.normal(0, 0.03, (6, 17, 2))
    views = np.array(["front", "back", "front", "side", "back", "front"])
    out = E.pck_by_view(pred, target, views)
    assert [k for k in out if k.endswith(".n")] == ["front.n", "side.n", "back.n"]   # VIEWS order, none absent
    assert (out["front.n"], out["side.n"], out["back.n"]) == (3, 1, 2)
    for v in ("front", "side", "back"):
        assert out[f"{v}.pck@0.1"] == E.pck(pred[views == v], target[views == v])["pck@0.1"]
    with pytest.raises(ValueError, match="5 views"):
        E.pck_by_view(pred, target, views[:5])
