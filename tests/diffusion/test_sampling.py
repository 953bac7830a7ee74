"""The DDIM sampler: the loop and its wrappers against a plain reference loop (bit for bit), the settings'
check, one DDIM step against diffusers' DDIMScheduler, and the snapshot row the notebooks draw."""
import numpy as np
import pytest
import torch

from kpnb.diffusion import ldm, sampling, schedule

from helpers import random_poses as poses


def tiny(prediction="eps"):
    torch.manual_seed(0)
    m = ldm.make_ldm("tokens+skeleton", (3, 8, 8), base=16, mults=(1, 2), num_res_blocks=1, attn_ds=(2,), heads=2,
                     token_dim=16, prediction=prediction)
    with torch.no_grad():  # zero-initialised output layers would make every prediction 0
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return m.eval()


class FakeVQ(torch.nn.Module):
    """quantize = nearest of 5 grey levels, decode = 4x nearest upsampling."""

    def __init__(self):
        super().__init__()
        self.levels = torch.nn.Parameter(torch.linspace(-1, 1, 5), requires_grad=False)

    def quantize(self, h):
        idx = (h[..., None] - self.levels).abs().argmin(-1)
        return self.levels[idx], idx, torch.zeros(())

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=4.0)


def reference_ddim(m, p, *, steps, eta=0.0, guidance=1.0, interval=None, seed=0, x0=None, mask=None, x0_fn=None):
    """DDIM written out in one plain loop (ldm's p_sample_ddim order): draw x_T; per step blend the known region,
    guided eps, then the update; paste the known region at the end. All noise from one CPU generator."""
    g = torch.Generator().manual_seed(seed)
    B = len(p)
    shape = (B, *m.latent_shape)
    x = torch.randn(shape, generator=g)
    if mask is not None:
        mask = mask.view(1, 1, *mask.shape[-2:]) if mask.dim() == 2 else mask
    cond, uncond = m.cond(p), (m.cond.null(B) if guidance != 1.0 else None)
    lo, hi = interval or (0, m.schedule.T)
    abar = m.schedule.alphas_cumprod
    ts = m.schedule.ddim_timesteps(steps)
    trace = []
    for i, t in enumerate(ts):
        a_t, a_prev = float(abar[t]), float(abar[ts[i + 1]] if i + 1 < len(ts) else abar[0])
        tt = torch.full((B,), t, dtype=torch.long)
        if mask is not None:
            x = mask * m.schedule.add_noise(x0.expand(shape), torch.randn(shape, generator=g), tt) + (1 - mask) * x
        e = m.guided_eps(x, tt, cond, uncond, guidance if lo <= t < hi else 1.0).float()
        noise = torch.randn(shape, generator=g) if schedule.ddim_sigma(a_t, a_prev, eta) > 0 else None
        x, pred_x0 = schedule.ddim_step(x, e, a_t, a_prev, eta=eta, noise=noise, x0_fn=x0_fn)
        trace.append((t, x, pred_x0))
    if mask is not None:
        x = mask * x0.expand(shape) + (1 - mask) * x
    return x, trace


HALF = torch.zeros(8, 8)
HALF[:, :4] = 1
CASES = {
    "plain": dict(steps=5),
    "eta1_guided": dict(steps=5, eta=1.0, guidance=3.0),
    "interval": dict(steps=6, eta=0.5, guidance=3.0, interval=[0, 500]),
    "inpaint_snap": dict(steps=5, eta=1.0, guidance=2.0, interval=[100, 700], mask=HALF, snap=True),
}


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("case", list(CASES))
def test_ddim_sample_matches_the_plain_loop_bit_for_bit(prediction, case):
    m, p = tiny(prediction), poses(2)
    kw = dict(CASES[case])
    x0_fn = ldm.snap_to_codebook(FakeVQ(), 1.7) if kw.pop("snap", False) else None
    x0 = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(5)) if "mask" in kw else None
    want, trace = reference_ddim(m, p, seed=3, x0=x0, x0_fn=x0_fn, **kw)
    seen = []
    interval = kw.pop("interval", None)
    inpaint = {"x0": x0, "mask": kw.pop("mask")} if x0 is not None else {}
    got = sampling.ddim_sample(m, p, seed=3, callback=seen.append, guidance_interval=interval, x0_fn=x0_fn, **inpaint, **kw)
    assert torch.equal(got, want)
    assert [d["i"] for d in seen] == list(range(len(trace)))
    for d, (t, x, pred_x0) in zip(seen, trace):
        assert d["t"] == t and torch.equal(d["x"], x) and torch.equal(d["pred_x0"], pred_x0)
    if x0_fn is not None:  # snapped estimates lie on the codebook's levels (times the scale)
        assert set(torch.unique(seen[1]["pred_x0"] / 1.7).tolist()) <= set(torch.linspace(-1, 1, 5).tolist())


def test_the_cases_differ():
    """The settings above change the samples (so the bit-for-bit comparison compares different runs)."""
    m, p = tiny(), poses(2)
    runs = [sampling.ddim_sample(m, p, seed=3, steps=5, **kw)
            for kw in ({}, {"eta": 1.0}, {"guidance": 3.0}, {"guidance": 3.0, "guidance_interval": [0, 500]})]
    for i in range(len(runs)):
        for j in range(i):
            assert not torch.allclose(runs[i], runs[j])


def test_ddim_loop_with_an_oracle_model_function():
    """A model function that knows x0 gives pred_x0 = x0 at every level, and the loop ends at x0 scaled to the
    last level alphas_cumprod[0] (eta 0: the noise direction is the oracle's eps, sqrt(1 - a0) of it)."""
    s = schedule.Schedule()
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    calls = []

    def oracle(x, t):
        calls.append(t)
        a = float(s.alphas_cumprod[t])
        return (x - a ** 0.5 * x0) / (1 - a) ** 0.5

    seen = []
    xT = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    out = sampling.ddim_loop(oracle, xT, s.ddim_levels(8), callback=seen.append)
    assert calls == s.ddim_timesteps(8) and [d["t"] for d in seen] == calls
    for d in seen:
        torch.testing.assert_close(d["pred_x0"], x0, atol=1e-4, rtol=1e-4)
    a0 = float(s.alphas_cumprod[0])
    eps = (xT - float(s.alphas_cumprod[calls[0]]) ** 0.5 * x0) / (1 - float(s.alphas_cumprod[calls[0]])) ** 0.5
    torch.testing.assert_close(out, a0 ** 0.5 * x0 + (1 - a0) ** 0.5 * eps, atol=1e-4, rtol=1e-4)
    # x_fn replaces x_t before the model sees it
    sampling.ddim_loop(lambda x, t: calls.append(x.abs().max().item()) or torch.zeros_like(x), xT, s.ddim_levels(2),
                x_fn=lambda x, t: torch.zeros_like(x))
    assert calls[-2:] == [0.0, 0.0]


def test_ddim_levels():
    s = schedule.Schedule()
    lv = s.ddim_levels(4)
    assert [t for t, _, _ in lv] == s.ddim_timesteps(4) == [751, 501, 251, 1]
    a = s.alphas_cumprod
    assert lv[0] == (751, float(a[751]), float(a[501])) and lv[-1] == (1, float(a[1]), float(a[0]))


def test_unknown_settings_are_refused_by_name():
    m, p = tiny(), poses(1)
    with pytest.raises(TypeError, match=r"ddim_sample\(\).*'gudance', 'stepz'.*the settings are steps, eta"):
        sampling.ddim_sample(m, p, stepz=2, gudance=3.0)
    with pytest.raises(TypeError, match="'batch'"):
        sampling.sample_images(m, FakeVQ(), p, batch=2, steps=2)
    with pytest.raises(TypeError, match=r"ddim_snapshots\(\).*'n'"):
        sampling.ddim_snapshots(m, FakeVQ(), p[0], n=3, steps=4)
    assert sampling.DDIMSettings.of({"steps": 7, "eta": 0.5}) == sampling.DDIMSettings(steps=7, eta=0.5)


def test_ddim_snapshots():
    m, vq, p = tiny(), FakeVQ(), poses(1)
    assert sampling.snapshot_steps(50, 6) == [0, 10, 20, 29, 39, 49]
    assert sampling.snapshot_steps(5, 5) == [0, 1, 2, 3, 4] and sampling.snapshot_steps(5, 1) == [4]
    with pytest.raises(ValueError, match="n_snapshots"):
        sampling.snapshot_steps(4, 5)
    row = sampling.ddim_snapshots(m, vq, p[0], n_snapshots=3, seed=2, steps=5, eta=1.0, guidance=2.0)
    assert row.shape == (3, 32, 32, 3) and row.dtype == np.uint8
    seen = []
    final = sampling.ddim_sample(m, p, seed=2, steps=5, eta=1.0, guidance=2.0, callback=seen.append)
    want = [seen[0]["pred_x0"], seen[2]["pred_x0"], final]  # steps 0 and 2 of 0..4, then the sample itself
    np.testing.assert_array_equal(row, ldm.decode_latents(vq, torch.cat(want), m.scale_factor))
    with pytest.raises(ValueError, match="one pose"):
        sampling.ddim_snapshots(m, vq, poses(2), steps=3)


@pytest.mark.parametrize("betas", [(0.0015, 0.0195), (0.00085, 0.012)])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_diffusers(betas, prediction, eta):
    """kpnb's schedule is diffusers' "scaled_linear" (linear in sqrt(beta)); ldm's DDIM is DDIMScheduler with
    steps_offset=1 ("leading" spacing, timesteps k * T // steps + 1), set_alpha_to_one=False (the last step
    goes to alphas_cumprod[0]) and no clipping. Over a whole 7-step run, each step agrees."""
    diffusers = pytest.importorskip("diffusers")
    s = schedule.Schedule(1000, *betas)
    sched = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=betas[0], beta_end=betas[1],
                                    beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1,
                                    clip_sample=False,
                                    prediction_type={"eps": "epsilon", "v": "v_prediction"}[prediction])
    sched.set_timesteps(7)
    assert sched.timesteps.tolist() == s.ddim_timesteps(7)
    # diffusers keeps the schedule in float32, kpnb in float64
    torch.testing.assert_close(sched.alphas_cumprod.double(), s.alphas_cumprod, rtol=2e-6, atol=0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for t, a_t, a_prev in s.ddim_levels(7):
        out = torch.randn(x.shape, generator=g)  # what a UNet would output: eps or v
        noise = torch.randn(x.shape, generator=g) if eta > 0 else None
        want = sched.step(out, t, x, eta=eta, variance_noise=noise)
        eps = schedule.eps_and_x0(prediction, out, x, torch.tensor(a_t))[0]
        got, pred_x0 = schedule.ddim_step(x, eps, a_t, a_prev, eta=eta, noise=noise)
        torch.testing.assert_close(pred_x0, want.pred_original_sample, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, want.prev_sample, rtol=1e-4, atol=1e-5)
        x = want.prev_sample
