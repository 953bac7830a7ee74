"""Scoring a generator beyond one PCK number (kpnb.evaluate.generators), on a tiny untrained diffusion model, a VQ
stand-in and an untrained pose estimator: real poses over seeds, FID over seeds, the head region's FID, the
guidance sweep and DDIM speed."""
import numpy as np
import pytest
import torch

from kpnb.diffusion import ldm
from kpnb.evaluate import generators as G
from kpnb.evaluate import pose as pose_eval
from kpnb.evaluate.quality import ImageDistance
from kpnb.models.pose_net import PoseNet, predict
from kpnb.poses.analysis import pose_views
from kpnb.poses.pose import MISSING, VISIBLE
from kpnb.synth.renders import render_poses, render_truth

DDIM = {"steps": 2, "eta": 0.0, "guidance": 1.0, "guidance_interval": None}


def tiny_ldm():
    torch.manual_seed(0)
    m = ldm.make_ldm("skeleton", (3, 8, 8), base=16, mults=(1, 2), num_res_blocks=1, attn_ds=(2,), heads=2,
                     token_dim=16)
    with torch.no_grad():  # zero-initialised output layers would make every sample the same
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


class FakeVQ(torch.nn.Module):
    """quantize = identity, decode = 4x nearest upsampling (8x8 latents -> 32 px images)."""

    def __init__(self):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def quantize(self, h):
        return h, None, torch.zeros(())

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=4.0)


class MeanColour(torch.nn.Module):
    """Features for FID: each image's mean and spread per channel."""

    name = "mean colour"

    def forward(self, x):
        x = x.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


def estimator():
    torch.manual_seed(1)
    return PoseNet(image_size=32, width=4).eval()


def poses(n, seed=0):
    rng = np.random.default_rng(seed)
    p = np.zeros((n, 17, 3), np.float32)
    p[..., :2] = rng.uniform(0.2, 0.8, (n, 17, 2))
    p[..., 2] = VISIBLE
    return p


class FakeDistance:
    """score(images, seed): FID = the images' mean grey level + seed, KID = 2 x that; remembers its calls."""

    def __init__(self):
        self.calls = []

    def score(self, images, seed=0):
        self.calls.append(seed)
        v = float(np.asarray(images).mean()) + seed
        return {"fid": v, "kid": 2 * v, "kid_std": 0.0, "n_fake": len(images)}


def test_real_pose_scores_are_the_mean_over_seeds_against_the_annotation():
    m, vq, est = tiny_ldm(), FakeVQ(), estimator()
    target = poses(4)
    target[0, :5] = (0.0, 0.0, MISSING)  # an unlabelled face: never scored
    cond = target.copy()
    cond[0, :5] = (0.5, 0.2, VISIBLE)    # as completion would place it
    run = G.real_pose_scores(m, vq, est, cond, target, seeds=(0, 3), render_size=64, **DDIM)
    draws = [pose_eval.pose_fidelity(m, vq, est, cond, target=target, ceiling=run.ceiling, seed=s, **DDIM)
             for s in (0, 3)]
    assert run.scores["pck@0.1"] == pytest.approx(np.mean([d[1]["pck@0.1"] for d in draws]))
    assert run.scores["pck@0.1_spread"] == pytest.approx(abs(draws[0][1]["pck@0.1"] - draws[1][1]["pck@0.1"]) / 2)
    assert run.scores["n_joints"] == draws[0][1]["n_joints"] == int((target[..., 2] == VISIBLE).sum())
    np.testing.assert_array_equal(run.images, draws[0][0])
    renders = render_poses(cond, seed=0, image_size=32, render_size=64)
    np.testing.assert_array_equal(run.renders, renders)
    assert run.ceiling == pose_eval.ceiling(est, renders, target)
    views = pose_views(cond)
    assert sum(v for k, v in run.by_view.items() if k.endswith(".n")) == 4
    by_seed = [pose_eval.pck_by_view(predict(est, d[0]), target, views) for d in draws]
    for k, v in run.by_view.items():
        assert v == (by_seed[0][k] if k.endswith(".n") else pytest.approx(np.mean([b[k] for b in by_seed])))


def test_fid_over_seeds_reuses_the_first_draw_for_seed_zero():
    dist, drawn = FakeDistance(), []
    first = np.full((2, 4, 4, 3), 10, np.uint8)

    def sample(seed):
        drawn.append(seed)
        return np.full((2, 4, 4, 3), 20, np.uint8)

    out = G.fid_over_seeds(dist, first, sample, seeds=(0, 1))
    assert drawn == [1] and dist.calls == [0, 1]
    assert out == {"fid": pytest.approx(15.5), "fid_spread": pytest.approx(5.5), "kid": pytest.approx(31.0),
                   "kid_spread": pytest.approx(11.0)}


def test_head_fid_is_near_zero_for_the_real_heads_themselves():
    images, real_poses = render_truth(12, seed=4, image_size=32, render_size=64)
    dist = ImageDistance(images, MeanColour())
    out = G.head_fid(dist, images, real_poses, {"real": images, "dark": images // 4}, real_poses, kid_subset_size=6)
    assert set(out) == {"real", "dark"}
    assert abs(out["real"]) < 1e-3 < out["dark"]


def test_guidance_sweep_scores_each_scale_as_given():
    m, vq, est, dist = tiny_ldm(), FakeVQ(), estimator(), FakeDistance()
    p = poses(3)
    out = G.guidance_sweep(m, vq, est, p, dist, [0, 2.5], **DDIM)
    assert list(out) == [0, 2.5]
    for g in (0, 2.5):
        images, want = pose_eval.pose_fidelity(m, vq, est, p, seed=0, **{**DDIM, "guidance": float(g)})
        assert out[g]["pck@0.1"] == want["pck@0.1"] and out[g]["ap"] == pytest.approx(want["ap"], nan_ok=True)
        assert out[g]["fid"] == dist.score(images)["fid"] and out[g]["kid"] == 2 * out[g]["fid"]
    assert out[0]["fid"] != out[2.5]["fid"]  # the scale reached the sampler


def test_ddim_speed_times_each_named_scale():
    speed = G.ddim_speed(tiny_ldm(), poses(2), {"plain": 1.0, "guided": 2.0}, steps=2)
    assert list(speed) == ["plain", "guided"] and all(v > 0 for v in speed.values())
