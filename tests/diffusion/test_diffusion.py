"""Latent diffusion: schedule against the original, UNet layout, the DDIM step on hand-computed values, the
eps/v conversion, DDIM determinism, guidance, inpainting, bad poses, and a tiny model whose loss falls when
trained through kpnb.train.loop."""
import numpy as np
import pytest
import torch

from kpnb.core import settings as runs
from kpnb.diffusion import ldm, sampling, schedule
from kpnb.evaluate import pose as pose_eval
from kpnb.models import pose_net, unet
from kpnb.models.pose_net import PoseNet
from kpnb.poses.pose import HIDDEN, MISSING, VISIBLE, PoseError
from kpnb.run import bench
from kpnb.train import checkpoints
from kpnb.train import ldm as ldm_training

from helpers import random_poses as poses


def tiny(modes="tokens+skeleton", C=3, S=8, seed=0, prediction="eps"):
    torch.manual_seed(seed)
    m = ldm.make_ldm(modes, (C, S, S), base=16, mults=(1, 2), num_res_blocks=1, attn_ds=(2,), heads=2, token_dim=16,
                   prediction=prediction)
    # zero-initialised output layers would make every prediction 0; give the test model real outputs
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


def settings(**overrides):
    """The smoke preset's diffusion section with ``overrides``."""
    return {**runs.preset_config("smoke")["diffusion"], **overrides}


def test_schedule_is_ldm_linear():
    s = schedule.Schedule()
    want = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(s.betas.numpy(), want, rtol=1e-12)
    assert abs(s.betas[0].item() - 0.0015) < 1e-12 and abs(s.betas[-1].item() - 0.0195) < 1e-12
    ac = s.alphas_cumprod
    assert torch.all(ac[1:] < ac[:-1]) and 0 < ac[-1] < 0.01 and ac[0] == 1 - 0.0015
    # ldm's make_ddim_timesteps('uniform', 50, 1000): range(0, 1000, 20) + 1, sampled in reverse
    assert s.ddim_timesteps(50) == list(range(981, 0, -20))
    assert len(s.ddim_timesteps(30)) == 30 and s.ddim_timesteps(1000) == list(range(999, 0, -1))
    x0, n = torch.ones(2, 1, 1, 1), torch.zeros(2, 1, 1, 1)
    out = s.add_noise(x0, n, torch.tensor([0, 999]))
    torch.testing.assert_close(out.flatten(), ac[[0, 999]].sqrt().float())


def test_original_unet_layout_is_constructible():
    with torch.device("meta"):  # shapes only: 206M parameters need not be allocated here
        u = ldm.original_ldm().unet
    sd = u.state_dict()
    # the names and shapes of ldm's openaimodel.UNetModel (base 160, attention at ds 2, 4, 8, context 17)
    assert sd["input_blocks.0.0.weight"].shape == (160, 3, 3, 3)
    assert sd["input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"].shape == (320, 17)
    assert "input_blocks.1.1.norm.weight" not in sd                    # no attention at full resolution
    assert sd["middle_block.1.proj_in.weight"].shape == (640, 640, 1, 1)
    assert sd["output_blocks.2.2.conv.weight"].shape == (640, 640, 3, 3)  # the first upsample
    assert sd["out.2.weight"].shape == (3, 160, 3, 3)
    assert u.input_blocks[4][1].transformer_blocks[0].attn1.heads == 8
    assert len(u.input_blocks) == 12 and len(u.output_blocks) == 12


def test_ldm_state_dict_mapping_roundtrip():
    u = unet.UNet(unet.UNetConfig(in_channels=3, out_channels=3, base=16, mults=(1, 2), num_res_blocks=1,
                            attn_ds=(2,), heads=2, context_dim=17))
    sd = u.state_dict()
    sd_ldm = {"model.diffusion_model." + k: v for k, v in sd.items()}
    sd_ldm.update({"model_ema.diffusion_model" + k.replace(".", ""): v + 1 for k, v in sd.items()})
    sd_ldm["first_stage_model.encoder.conv_in.weight"] = torch.zeros(1)
    got = unet.unet_state_from_ldm(sd_ldm, ema=False)
    assert set(got) == set(sd)
    got_ema = unet.unet_state_from_ldm(sd_ldm, ema=True)
    u.load_state_dict(got_ema)
    k = "input_blocks.0.0.weight"
    torch.testing.assert_close(u.state_dict()[k], sd[k])  # +1 applied: loaded the EMA copy


def test_ddim_deterministic_for_a_seed():
    m = tiny()
    p = poses(2)
    a = sampling.ddim_sample(m, p, steps=5, eta=0.5, seed=3)
    b = sampling.ddim_sample(m, p, steps=5, eta=0.5, generator=torch.Generator().manual_seed(3))
    c = sampling.ddim_sample(m, p, steps=5, eta=0.5, seed=4)
    assert a.shape == (2, 3, 8, 8) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_guidance_scales():
    m = tiny()
    p = poses(3)
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([10, 500, 900])
    cond, uncond = m.cond(p), m.cond.null(3)
    e_c, e_u = m.eps(x, t, cond), m.eps(x, t, uncond)
    assert not torch.allclose(e_c, e_u)
    torch.testing.assert_close(m.guided_eps(x, t, cond, uncond, 1.0), e_c)
    torch.testing.assert_close(m.guided_eps(x, t, cond, uncond, 0.0), e_u)
    # the batched two-branch path: eps_u + s (eps_c - eps_u)
    torch.testing.assert_close(m.guided_eps(x, t, cond, uncond, 3.0), e_u + 3.0 * (e_c - e_u), atol=1e-5, rtol=1e-5)
    # and the sampler at scale 0 ignores the pose entirely
    a = sampling.ddim_sample(m, p, steps=3, guidance=0.0, seed=1)
    b = sampling.ddim_sample(m, poses(3, seed=9), steps=3, guidance=0.0, seed=1)
    torch.testing.assert_close(a, b)


def test_guidance_interval_applies_guidance_only_at_its_timesteps():
    m = tiny()
    p = poses(3)
    ts = [int(t) for t in m.schedule.ddim_timesteps(4)]  # the 4 DDIM timesteps in sampling order, high to low
    full = sampling.ddim_sample(m, p, steps=4, guidance=3.0, seed=1)
    none = sampling.ddim_sample(m, p, steps=4, guidance=1.0, seed=1)
    assert not torch.allclose(full, none)
    # an interval holding every timestep is plain guidance; one holding none of them is conditional only
    torch.testing.assert_close(sampling.ddim_sample(m, p, steps=4, guidance=3.0, guidance_interval=[0, m.schedule.T],
                                             seed=1), full)
    torch.testing.assert_close(sampling.ddim_sample(m, p, steps=4, guidance=3.0, guidance_interval=[ts[0] + 1, 1000],
                                             seed=1), none)
    # guidance at the low-noise steps only: the steps before them run as conditional only, so the latents
    # seen by the callback agree with the unguided run until the first guided step, and differ after it
    seen = {}
    for g, iv in (("none", None), ("low", [0, ts[2] + 1])):
        seen[g] = []
        sampling.ddim_sample(m, p, steps=4, guidance=1.0 if g == "none" else 3.0, guidance_interval=iv, seed=1,
                      callback=lambda d, k=g: seen[k].append(d["x"].clone()))
    # steps 0 and 1 (ts[0], ts[1]) unguided, steps 2 and 3 guided
    torch.testing.assert_close(seen["low"][1], seen["none"][1])
    assert not torch.allclose(seen["low"][2], seen["none"][2])
    for bad in ([5, 5], [-1, 10], [0, 1001], [1], "ab"):
        with pytest.raises(ValueError, match="guidance_interval"):
            sampling.ddim_sample(m, p, steps=2, guidance=3.0, guidance_interval=bad, seed=0)


def test_callback_and_inpainting():
    m = tiny("skeleton")
    p = poses(2)
    seen = []
    sampling.ddim_sample(m, p, steps=4, seed=0, callback=seen.append)
    assert [s["i"] for s in seen] == [0, 1, 2, 3] and seen[0]["t"] == 751 and seen[-1]["t"] == 1
    assert seen[0]["pred_x0"].shape == (2, 3, 8, 8) and set(seen[0]) == {"i", "t", "x", "pred_x0"}
    x0 = torch.randn(1, 3, 8, 8)
    keep = sampling.ddim_sample(m, p, steps=4, seed=0, x0=x0, mask=torch.ones(8, 8))
    torch.testing.assert_close(keep, x0.expand(2, -1, -1, -1))
    free = sampling.ddim_sample(m, p, steps=4, seed=0, x0=x0, mask=torch.zeros(8, 8))
    torch.testing.assert_close(free, sampling.ddim_sample(m, p, steps=4, seed=0))
    half = torch.zeros(8, 8)
    half[:, :4] = 1
    mixed = sampling.ddim_sample(m, p, steps=4, seed=0, x0=x0, mask=half)
    torch.testing.assert_close(mixed[..., :4], x0.expand(2, -1, -1, -1)[..., :4])
    with pytest.raises(ValueError, match="needs x0"):
        sampling.ddim_sample(m, p, steps=2, mask=half)


def test_bad_poses_to_the_sampler():
    m = tiny("tokens")
    p = poses(1).numpy()
    with pytest.raises(PoseError, match=r"shape \[B, 17, 3\]"):
        sampling.ddim_sample(m, p[:, :16], steps=2)
    q = p.copy()
    q[0, 5, 1] = np.nan
    with pytest.raises(PoseError, match="shoulder_left.*not finite"):
        sampling.ddim_sample(m, q, steps=2)
    q = p.copy()
    q[0, 0, 2] = 4
    with pytest.raises(PoseError, match="nose.*visibility code"):
        sampling.ddim_sample(m, q, steps=2)
    q = p.copy()
    q[0, :, 2] = MISSING  # a legal pose with nothing known still samples
    assert sampling.ddim_sample(m, q, steps=2, seed=0).shape == (1, 3, 8, 8)


def test_tiny_model_learns_and_reloads(tmp_path):
    torch.manual_seed(0)
    N = 64
    p = poses(N, seed=1)
    # latents that depend on the pose: a blob at the nose position, so conditioning matters
    yy, xx = torch.meshgrid(torch.arange(8) + 0.5, torch.arange(8) + 0.5, indexing="ij")
    nose = p[:, 0, :2] * 8
    blob = torch.exp(-((xx - nose[:, 0, None, None]) ** 2 + (yy - nose[:, 1, None, None]) ** 2) / 2)
    lat = torch.stack([blob, -blob, 0.5 * blob], 1) * 3
    cfg = settings(steps=30, batch_size=16, lr=3e-3, warmup=5, ckpt_every=15, attn_ds=[2], prediction="eps",
                   min_snr=0.0, lr_schedule="cosine")
    data = ldm_training.LatentSet(lat, p)
    model, res = ldm_training.train_ldm(data, cfg, tmp_path / "ldm", "tokens+skeleton", progress=False)
    losses = [r["loss"] for r in res.history]
    assert losses[-1] < 0.6 * losses[0], losses
    assert abs(model.scale_factor - 1 / lat.std().item()) < 1e-5
    again = ldm_training.load_ldm(tmp_path / "ldm")
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    c = model.cond(p[:2])
    torch.testing.assert_close(again.eps(x, t, again.cond(p[:2])), model.eps(x, t, c))
    assert again.config() == model.config()
    # a second call resumes from the finished checkpoint (fused AdamW state included) and runs 3 more steps
    _, res2 = ldm_training.train_ldm(data, {**cfg, "steps": 33}, tmp_path / "ldm", "tokens+skeleton", progress=False)
    assert res2.start_step == 30 and res2.step == 33


def test_ddim_update_with_an_oracle():
    """With the exact noise of a known x0, every step's pred_x0 is x0, and the result is x0 at ldm's last
    level alphas_cumprod[0] (ldm's DDIM ends there, not at alpha = 1)."""
    m = tiny("skeleton")
    x0 = torch.randn(2, 3, 8, 8)
    s = m.schedule
    m.guided_eps = lambda x, t, c, u, g: (x - s.abar(t, x).sqrt() * x0) / (1 - s.abar(t, x)).sqrt()
    seen = []
    out = sampling.ddim_sample(m, poses(2), steps=10, seed=0, callback=seen.append)
    for st in seen:
        torch.testing.assert_close(st["pred_x0"], x0, atol=1e-4, rtol=1e-4)
    a0 = s.alphas_cumprod[0].item()
    a1 = s.alphas_cumprod[seen[-1]["t"]].item()
    e = (seen[-2]["x"] - a1 ** 0.5 * x0) / (1 - a1) ** 0.5
    torch.testing.assert_close(out, a0 ** 0.5 * x0 + (1 - a0) ** 0.5 * e, atol=1e-4, rtol=1e-4)
    # x0_fn acts on each step's x0 estimate (here: a clamp)
    seen.clear()
    sampling.ddim_sample(m, poses(2), steps=4, seed=0, callback=seen.append, x0_fn=lambda z: z.clamp(-0.1, 0.1))
    assert all(st["pred_x0"].abs().max() <= 0.1 + 1e-6 for st in seen)


def test_min_snr_weighting():
    m = tiny("tokens")
    z, p = torch.randn(8, 3, 8, 8), poses(8)
    plain = m.loss(z, p, generator=torch.Generator().manual_seed(0))
    same = m.loss(z, p, min_snr=1e9, generator=torch.Generator().manual_seed(0))
    low = m.loss(z, p, min_snr=1.0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain, same)
    assert low < plain


def test_v_prediction_target_and_conversion():
    """A v model's UNet predicts v = sqrt(abar) eps - sqrt(1 - abar) x0: with a UNet that outputs the true v
    the loss is 0 and eps() gives back the true noise (so DDIM and guidance work unchanged); the choice
    survives a config round trip and an unknown one is refused."""
    m = tiny("skeleton", prediction="v")
    z0, p = torch.randn(4, 3, 8, 8), poses(4)

    def true_v(x, tt, c):  # the v of x = sqrt(abar) z0 + sqrt(1 - abar) noise, for the known z0
        a = m.schedule.abar(tt, x)
        noise = (x - a.sqrt() * z0) / (1 - a).sqrt()
        return a.sqrt() * noise - (1 - a).sqrt() * z0

    m.net = true_v
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, m.schedule.T, (4,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    x = m.schedule.add_noise(z0, noise, t)
    torch.testing.assert_close(m.eps(x, t, m.cond(p)), noise, atol=1e-5, rtol=1e-5)
    assert float(m.loss(z0, p, p_uncond=0.0, min_snr=5.0)) < 1e-8
    assert ldm.KeypointLDM.from_config(m.config()).prediction == "v"
    old = m.config()
    del old["prediction"]   # checkpoints written before v existed are epsilon models
    assert ldm.KeypointLDM.from_config(old).prediction == "eps"
    with pytest.raises(ValueError, match="prediction"):
        tiny(prediction="x0")


class FakeVQ(torch.nn.Module):
    """encode = 4x4 average pool, quantize = nearest of 5 grey levels, decode = nearest upsampling."""

    def __init__(self):
        super().__init__()
        self.levels = torch.nn.Parameter(torch.linspace(-1, 1, 5), requires_grad=False)

    def encode(self, x):
        return torch.nn.functional.avg_pool2d(x, 4)

    def quantize(self, h):
        idx = (h[..., None] - self.levels).abs().argmin(-1)
        return self.levels[idx], idx, torch.zeros(())

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=4.0)


def test_latents_roundtrip_and_sampling_plumbing():
    vq = FakeVQ()
    imgs = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    lat = ldm.encode_latents(vq, imgs, batch_size=3)
    assert lat.shape == (4, 3, 8, 8)
    sf = ldm.scale_factor_of(lat)
    assert abs((lat * sf).std().item() - 1) < 1e-5
    back = ldm.decode_latents(vq, lat * sf, sf)
    assert back.shape == (4, 32, 32, 3) and back.dtype == np.uint8
    assert set(np.unique(back)) <= {0, 64, 128, 191, 255}  # quantised to the 5 levels, in uint8
    snap = ldm.snap_to_codebook(vq, sf)
    assert set(torch.unique(snap(lat * sf) / sf).tolist()) <= set(vq.levels.tolist())
    m = tiny("skeleton")
    m.scale_factor = sf
    out = sampling.sample_images(m, vq, poses(3), steps=2, batch_size=2, seed=1)
    assert out.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(out[2:], sampling.sample_images(m, vq, poses(3)[2:], steps=2, batch_size=2, seed=2))
    est = PoseNet(image_size=32, width=8)
    imgs2, metrics = pose_eval.pose_fidelity(m, vq, est, poses(3), steps=2, ceiling={"pck@0.1": 0.5})
    assert imgs2.shape == (3, 32, 32, 3) and 0 <= metrics["pck@0.1"] <= 1
    assert metrics["pck@0.1.ratio"] == pytest.approx(metrics["pck@0.1"] / 0.5)
    assert metrics["sample_images_per_s"] > 0
    # scored against a target: the same images (same seed), other truth - here the poses the estimator finds
    pred = pose_net.predict(est, imgs2)
    found = pred.copy()
    found[..., 2] = VISIBLE
    _, vs_target = pose_eval.pose_fidelity(m, vq, est, poses(3), steps=2, target=found)
    assert vs_target["pck@0.1"] == pytest.approx(pose_eval.pck(pred, found)["pck@0.1"])
    assert vs_target["pck@0.1"] > metrics["pck@0.1"] + 0.3   # (joints it calls outside count as not found)
    with pytest.raises(ValueError, match="target"):
        pose_eval.pose_fidelity(m, vq, est, poses(3), steps=2, target=poses(2))


def test_positional_embedding_lets_attention_see_position():
    torch.manual_seed(0)
    x = torch.ones(1, 16, 4, 4)  # a constant map: without positions every place is treated alike
    for pos, varies in ((0, False), (3, True)):
        st = unet.SpatialTransformer(16, 2, None, 1, True, 0.0, 8, pos_freqs=pos)
        with torch.no_grad():
            torch.nn.init.normal_(st.proj_out.weight, std=0.1)
        out = st(x, None)
        assert (out.std((2, 3)).max() > 1e-4) == varies


def test_bench_ldm_reports_training_and_sampling_speed():
    r = bench.bench_ldm_model(tiny("tokens"), batch_size=2, steps=1, sample_steps=2, device=torch.device("cpu"))
    assert r["modes"] == "tokens" and r["train.gflop_per_image"] > 0 and r["train.images_per_s"] > 0
    assert r["ddim2.images_per_s"] > 0 and r["ddim_guided2.images_per_s"] > 0


def test_unknown_lr_schedule_is_refused(tmp_path):
    z, p = torch.randn(8, 3, 8, 8), poses(8)
    cfg = settings(steps=2, batch_size=4, mults=[1], attn_ds=[], token_dim=8, lr_schedule="warm")
    with pytest.raises(ValueError, match="lr_schedule"):
        ldm_training.train_ldm(ldm_training.LatentSet(z, p), cfg, tmp_path / "a", "grid", progress=False)
    del cfg["lr_schedule"]
    with pytest.raises(KeyError, match="lack lr_schedule"):  # the preset is the one place for the settings
        ldm_training.train_ldm(ldm_training.LatentSet(z, p), cfg, tmp_path / "a", "grid", progress=False)


def test_sample_kwargs_from_a_preset():
    cfg = settings(sample_steps=7, eta=0.5, guidance=2.0, guidance_interval=[0, 400])
    assert sampling.sample_kwargs(cfg) == {"steps": 7, "solver": "ddim", "eta": 0.5, "guidance": 2.0,
                                           "guidance_interval": [0, 400]}


def test_ddim_step_on_hand_computed_values():
    """DDIM eq. 12 and 16 with a_t = abar_t = 0.36 (sqrt 0.6, sqrt(1 - a_t) = 0.8) and a_prev = 0.64 (sqrt 0.8,
    sqrt(1 - a_prev) = 0.6), worked out by hand."""
    x_t = torch.tensor([1.0, -0.5], dtype=torch.float64)
    eps = torch.tensor([0.5, 1.0], dtype=torch.float64)
    # eta = 0: x0 = (x_t - 0.8 eps) / 0.6 = [0.6, -1.3] / 0.6; x_prev = 0.8 x0 + 0.6 eps
    x_prev, x0 = schedule.ddim_step(x_t, eps, 0.36, 0.64)
    torch.testing.assert_close(x0, torch.tensor([1.0, -1.3 / 0.6], dtype=torch.float64))
    torch.testing.assert_close(x_prev, torch.tensor([0.8 + 0.3, -0.8 * 1.3 / 0.6 + 0.6], dtype=torch.float64))
    # eq. 16: sigma(eta)^2 = eta^2 (1 - 0.64) / (1 - 0.36) (1 - 0.36 / 0.64) = eta^2 * 0.5625 * 0.4375
    assert schedule.ddim_sigma(0.36, 0.64, 1.0) == pytest.approx(0.24609375 ** 0.5)
    assert schedule.ddim_sigma(0.36, 0.64, 0.0) == 0.0
    # eta chosen so that sigma^2 = 0.2: the direction to x_t gets sqrt(1 - 0.64 - 0.2) = 0.4
    eta = (0.2 / 0.24609375) ** 0.5
    noise = torch.tensor([1.0, -1.0], dtype=torch.float64)
    x_prev, _ = schedule.ddim_step(x_t, eps, 0.36, 0.64, eta=eta, noise=noise)
    s = 0.2 ** 0.5
    torch.testing.assert_close(x_prev, torch.tensor([0.8 + 0.4 * 0.5 + s, -0.8 * 1.3 / 0.6 + 0.4 * 1.0 - s],
                                                    dtype=torch.float64))
    with pytest.raises(ValueError, match="noise"):
        schedule.ddim_step(x_t, eps, 0.36, 0.64, eta=eta)
    # x0_fn: x0 clamped to [-1, 1] = [1, -1]; eps follows it: (x_t - 0.6 x0) / 0.8 = [0.5, 0.125]
    x_prev, x0 = schedule.ddim_step(x_t, eps, 0.36, 0.64, x0_fn=lambda z: z.clamp(-1, 1))
    torch.testing.assert_close(x0, torch.tensor([1.0, -1.0], dtype=torch.float64))
    torch.testing.assert_close(x_prev, torch.tensor([0.8 + 0.6 * 0.5, -0.8 + 0.6 * 0.125], dtype=torch.float64))


def test_prediction_conversion_round_trip():
    # by hand at abar 0.36: v = 0.6 eps - 0.8 x0 = 0.6 * 0.5 - 0.8 * 1 = -0.5
    a = torch.tensor(0.36, dtype=torch.float64)
    x0, noise = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
    torch.testing.assert_close(schedule.prediction_target("v", x0, noise, a), torch.tensor([-0.5], dtype=torch.float64))
    assert schedule.prediction_target("eps", x0, noise, a) is noise
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    a = schedule.Schedule().abar(torch.tensor([0, 500, 999]), x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    for prediction in schedule.PREDICTIONS:
        out = schedule.prediction_target(prediction, x0, noise, a)
        eps, x0_back = schedule.eps_and_x0(prediction, out, x_t, a)
        torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(x0_back, x0, atol=2e-3, rtol=1e-3)  # eps at t=999: x0 / sqrt(abar) amplifies


def test_train_on_rows_reads_only_those_rows(tmp_path):
    # the rows outside the subset are NaN: one of them in a batch would stop training with a non-finite loss
    z, p = torch.randn(12, 3, 8, 8), poses(12)
    rows = np.array([1, 4, 5, 9])
    z[np.setdiff1d(np.arange(12), rows)] = float("nan")
    cfg = settings(steps=4, batch_size=4, mults=[1], attn_ds=[], token_dim=8)
    data = ldm_training.LatentSet(z, p, rows=rows, scale_factor=1.0)
    model, res = ldm_training.train_ldm(data, cfg, tmp_path / "a", "skeleton", progress=False)
    assert res.step == 4 and all(torch.isfinite(q).all() for q in model.parameters())
    assert checkpoints.read_checkpoint_info(tmp_path / "a")["config"]["n_train"] == 4
    with pytest.raises(ValueError, match="rows"):
        ldm_training.train_ldm(ldm_training.LatentSet(z, p, rows=[12], scale_factor=1.0), cfg, tmp_path / "b",
                               "skeleton", progress=False)


def test_joint_drop_trains_the_missing_and_hidden_codes(tmp_path):
    # every training pose is fully visible: without joint_drop the "missing" and "hidden" embeddings never
    # get a gradient, so a person's annotation with unlabelled joints would meet untrained vectors
    z, p = torch.randn(16, 3, 8, 8), poses(16)
    cfg = settings(steps=3, batch_size=8, mults=[1], attn_ds=[], token_dim=8, p_uncond=0.0, joint_drop=0.0)
    torch.manual_seed(cfg["seed"])  # the initial weights train_ldm starts from
    init = ldm.ldm_from_settings(cfg, "tokens", (3, 8, 8), scale_factor=1.0)
    rows = [MISSING, HIDDEN]
    before = init.cond.vis_emb.weight[rows].clone()
    data = ldm_training.LatentSet(z, p, scale_factor=1.0)
    off, _ = ldm_training.train_ldm(data, cfg, tmp_path / "off", "tokens", progress=False)
    on, _ = ldm_training.train_ldm(data, {**cfg, "joint_drop": 0.3}, tmp_path / "on", "tokens", progress=False)
    assert torch.equal(off.cond.vis_emb.weight[rows], before)
    assert (on.cond.vis_emb.weight[rows] - before).abs().amax(1).min() > 0
    assert checkpoints.read_checkpoint_info(tmp_path / "on")["config"]["train"]["joint_drop"] == 0.3
    assert "joint_drop" not in checkpoints.read_checkpoint_info(tmp_path / "off")["config"]["train"]
