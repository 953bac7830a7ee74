"""DPM-Solver++(2M) beside DDIM: the loop against diffusers' DPMSolverMultistepScheduler step by step, its
accuracy against a fine DDIM reference, and the ``solver`` setting of ddim_sample."""
import numpy as np
import pytest
import torch

from kpnb.diffusion import sampling, schedule

from helpers import random_poses as poses
from test_sampling import tiny

S = schedule.Schedule()


def gaussian_toy(x, t):
    """The exact noise prediction when each element of x0 is N(0, v), v from 0.05 to 2 over the elements:
    E[x0 | x_t] = sqrt(a) v x_t / (a v + 1 - a) (a smooth model whose x0 estimate changes with the noise level)."""
    a = float(S.alphas_cumprod[t])
    v = torch.linspace(0.05, 2.0, x[0].numel(), dtype=x.dtype).view(x[0].shape)
    x0 = a ** 0.5 * v * x / (a * v + 1 - a)
    return (x - a ** 0.5 * x0) / (1 - a) ** 0.5


def toy(x, t):
    """gaussian_toy plus a small nonlinear, t-dependent term (so the model is not linear in x)."""
    return gaussian_toy(x, t) + 0.1 * torch.tanh(x.roll(1, -1) * (1 + t / 1000))


def levels(ts):
    """DDIM levels ``(t, a_t, a_prev)`` over the descending timesteps ``ts``, the last going to alphas_cumprod[0]."""
    a = S.alphas_cumprod
    return [(t, float(a[t]), float(a[n])) for t, n in zip(ts, ts[1:] + [0])]


def x_T(dtype=torch.float64):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_matches_diffusers(steps):
    """kpnb's DDIM timesteps passed to the scheduler as they are; final_sigmas_type="sigma_min" ends at
    alphas_cumprod[0] as kpnb does; lower_order_final (diffusers' default) takes the last step in first order
    below 15 steps. diffusers runs in float32, kpnb here in float64."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=S.T, beta_start=S.beta_start, beta_end=S.beta_end, beta_schedule="scaled_linear",
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", prediction_type="epsilon",
        final_sigmas_type="sigma_min", lower_order_final=True)
    sched.set_timesteps(timesteps=S.ddim_timesteps(steps))
    assert sched.timesteps.tolist() == S.ddim_timesteps(steps)
    seen = []
    got = sampling.dpmpp_2m_loop(toy, x_T(), S.ddim_levels(steps), callback=seen.append)
    x, want = x_T(), []
    for t in sched.timesteps:
        x = sched.step(toy(x, int(t)), t, x).prev_sample
        want.append(x)
    assert [d["t"] for d in seen] == S.ddim_timesteps(steps) and [d["i"] for d in seen] == list(range(steps))
    for d, w in zip(seen, want):
        torch.testing.assert_close(d["x"], w, rtol=0, atol=1e-4)
    torch.testing.assert_close(got, want[-1], rtol=0, atol=1e-4)
    # a first-order solver over the same steps lands far from it (the comparison can fail)
    assert (sampling.ddim_loop(toy, x_T(), S.ddim_levels(steps)) - got).abs().max() > 0.05


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_is_closer_than_ddim_to_a_fine_reference(steps):
    """Both against 500 DDIM steps over the same span (ddim_levels(500) itself would start at t = 999, another
    solution of the ODE than the one from t = 901 where 10 steps start). Within the run, at the level of
    t = 1 + T // steps, 2M's error is under half of DDIM's (0.07 of it at 10 steps). The last two steps are long in
    lambda, which costs both solvers most of their error: over the whole run 2M is still the closer (largest
    errors at 5 / 10 / 20 steps: 0.68 / 0.48 / 0.22 against DDIM's 0.93 / 0.50 / 0.26)."""
    ts = S.ddim_timesteps(steps)
    for end, whole in ((ts[-2], False), (ts[-1], True)):
        fine = [int(v) for v in np.linspace(ts[0], end, 500).round()]
        assert len(set(fine)) == 500
        ref = sampling.ddim_loop(gaussian_toy, x_T(), levels(fine) if whole else levels(fine)[:-1])
        errors = []
        for loop in (sampling.ddim_loop, sampling.dpmpp_2m_loop):  # within the whole run: x at the level of `end`
            xs = []
            last = loop(gaussian_toy, x_T(), S.ddim_levels(steps), callback=lambda d: xs.append(d["x"]))
            errors.append(((last if whole else xs[-3]) - ref).abs().max().item())
        ddim, dpm = errors
        print(f"{steps} steps, {'whole run' if whole else f'to t={end}'}: largest error DDIM {ddim:.4f}, "
              f"DPM-Solver++(2M) {dpm:.4f}")
        assert dpm < (ddim if whole else ddim / 2)


def test_dpmpp_2m_with_an_oracle_and_a_last_step_to_sigma_0():
    """A model function that knows x0: every x0 estimate is x0 (after x0_fn), so 2M's correction is 0 and it
    ends where DDIM does; a last level a_prev = 1 (sigma 0) lands on the x0 estimate itself."""
    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def oracle(x, t):
        a = float(S.alphas_cumprod[t])
        return (x - a ** 0.5 * x0) / (1 - a) ** 0.5

    xT, lv = x_T()[:, :3, :4, :4], S.ddim_levels(8)
    seen = []
    out = sampling.dpmpp_2m_loop(oracle, xT, lv, callback=seen.append)
    torch.testing.assert_close(out, sampling.ddim_loop(oracle, xT, lv), rtol=0, atol=1e-10)
    for d in seen:
        torch.testing.assert_close(d["pred_x0"], x0, rtol=0, atol=1e-10)
    to_clean = lv[:-1] + [(lv[-1][0], lv[-1][1], 1.0)]
    torch.testing.assert_close(sampling.dpmpp_2m_loop(oracle, xT, to_clean), x0, rtol=0, atol=1e-10)
    # x0_fn acts on each estimate (the callback sees it), x_fn on x_t before the model
    seen = []
    sampling.dpmpp_2m_loop(oracle, xT, lv, x0_fn=lambda z: z.clamp(-0.5, 0.5), callback=seen.append)
    assert all(d["pred_x0"].abs().max() <= 0.5 for d in seen)
    calls = []
    sampling.dpmpp_2m_loop(lambda x, t: calls.append(x.abs().max().item()) or torch.zeros_like(x), xT,
                           S.ddim_levels(2), x_fn=lambda x, t: torch.zeros_like(x))
    assert calls == [0.0, 0.0]


def test_the_solver_setting_is_checked():
    m, p = tiny(), poses(1)
    with pytest.raises(ValueError, match=r"solver.*'ddim', 'dpmpp_2m'.*'heun'"):
        sampling.ddim_sample(m, p, steps=2, solver="heun")
    with pytest.raises(ValueError, match=r"eta must be 0 with solver 'dpmpp_2m'.*0\.5"):
        sampling.ddim_sample(m, p, steps=2, solver="dpmpp_2m", eta=0.5)
    assert sampling.DDIMSettings().solver == "ddim"


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_sample_with_dpmpp_2m(prediction):
    """ddim_sample(solver="dpmpp_2m") is dpmpp_2m_loop over the guided model function, bit for bit, and differs
    from DDIM; inpainting keeps x0 where the mask is 1."""
    m, p = tiny(prediction), poses(2)
    seen = []
    got = sampling.ddim_sample(m, p, seed=3, steps=5, guidance=2.0, solver="dpmpp_2m", callback=seen.append)
    x = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(3))
    want = sampling.dpmpp_2m_loop(sampling.guided(m, p, 2.0), x, m.schedule.ddim_levels(5))
    assert torch.equal(got, want) and [d["t"] for d in seen] == m.schedule.ddim_timesteps(5)
    assert torch.isfinite(got).all()
    assert not torch.allclose(got, sampling.ddim_sample(m, p, seed=3, steps=5, guidance=2.0))
    x0, mask = torch.randn(1, *m.latent_shape), torch.zeros(8, 8)
    mask[:, :4] = 1
    out = sampling.ddim_sample(m, p, seed=3, steps=4, solver="dpmpp_2m", x0=x0, mask=mask)
    assert torch.equal(out[..., :4], x0.expand_as(out)[..., :4])
