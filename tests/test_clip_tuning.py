import math

import numpy as np
import pytest
import torch

from kpnb import clip as kc, clip_tuning as ct, vq

TINY_CLIP = kc.domain_clip_config(image_size=16, patch_size=4, width=32, layers=1, text_width=32, text_layers=1,
                                  context_length=8, embed_dim=32)


def test_spherical_distance_on_hand_made_vectors():
    e1, e2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    assert float(ct.spherical_dist_loss(e1, e1)) == pytest.approx(0.0, abs=1e-6)
    # orthogonal: |e1 - e2| = sqrt(2), arcsin(sqrt(2)/2) = pi/4, 2 * (pi/4)^2 = pi^2/8
    assert float(ct.spherical_dist_loss(e1, e2)) == pytest.approx(math.pi ** 2 / 8, rel=1e-5)
    assert float(ct.spherical_dist_loss(e1, -e1)) == pytest.approx(math.pi ** 2 / 2, rel=1e-5)
    # only directions count, and it is theta^2 / 2 for the angle theta
    v = torch.tensor([[3.0, 3.0, 0.0]])
    assert float(ct.spherical_dist_loss(v, 7 * e1)) == pytest.approx((math.pi / 4) ** 2 / 2, rel=1e-5)


def test_clamp_with_grad_keeps_inward_gradients():
    x = torch.tensor([-0.5, 0.5, 1.5, 1.5], requires_grad=True)
    y = ct.clamp_with_grad(x, 0.0, 1.0)
    assert y.tolist() == [0.0, 0.5, 1.0, 1.0]
    # gradient descent moves x by -grad: +1 on x=1.5 pulls it back in (kept), -1 pushes it out (dropped)
    (y * torch.tensor([-1.0, 2.0, 1.0, -1.0])).sum().backward()
    assert x.grad.tolist() == [-1.0, 2.0, 1.0, 0.0]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    torch.manual_seed(0)
    cfg = vq.VQConfig(factor=4, image_size=16, latent_channels=4, n_codes=64, base_width=8, channel_mult=(1, 2),
                      res_blocks=1, dec_res_blocks=1, stem=2, mid_attention=False)
    model = vq.VQModel(cfg)
    with torch.no_grad():  # a codebook spread like the encoder's outputs, as after training
        h = model.encode(torch.rand(8, 3, 16, 16) * 2 - 1)
        model.quantizer.init_from(h.permute(0, 2, 3, 1).reshape(-1, 4))
    clip_model = kc.create_domain_clip(TINY_CLIP, tmp_path_factory.mktemp("clip"), seed=0).eval()
    return model.eval(), clip_model


def _images(n=2):
    return np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3)).astype(np.uint8)


def test_tuning_lowers_the_loss_and_leaves_models_alone(tiny_models):
    model, clip_model = tiny_models
    before = {k: v.clone() for k, v in {**model.state_dict(), **clip_model.state_dict()}.items()}
    seen = []
    res = ct.tune(model, clip_model, _images(), "a girl with red hair", steps=15, lr=0.2, cutouts=4,
                  record_every=5, progress=False, callback=lambda s, im, row: seen.append(s))
    losses = [r["clip_loss"] for r in res.history]
    assert len(res.history) == 16 and seen == [0, 5, 10, 15]
    assert np.mean(losses[-3:]) < losses[0]
    assert (res.clip_score_after > res.clip_score_before).all()
    assert res.image.shape == (2, 16, 16, 3) and res.image.dtype == np.uint8
    assert res.history[5]["images"].shape == (2, 16, 16, 3) and "images" not in res.history[1]
    # the latent is a codebook vector everywhere (quantised) and the models did not change
    codes = model.quantizer.codes()
    flat = res.latent.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.cdist(flat, codes, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-5
    after = {**model.state_dict(), **clip_model.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in [*model.parameters(), *clip_model.parameters()])


def test_anchor_and_extra_loss(tiny_models):
    model, clip_model = tiny_models
    z0 = model.encode(torch.from_numpy(_images()).permute(0, 3, 1, 2).float() / 127.5 - 1).detach()
    calls = []

    def keep_dark(x):
        calls.append(tuple(x.shape))
        assert x.min() >= 0 and x.max() <= 1 and x.requires_grad
        return 10.0 * x.mean()

    free = ct.tune(model, clip_model, z0, ["red hair", "blue hair"], steps=10, lr=0.2, cutouts=2, progress=False)
    held = ct.tune(model, clip_model, z0, ["red hair", "blue hair"], steps=10, lr=0.2, cutouts=2, progress=False,
                   anchor_weight=1e4)
    assert held.history[-1]["anchor"] < 0.1 * free.history[-1]["anchor"]
    dark = ct.tune(model, clip_model, z0, "red hair", steps=10, lr=0.2, cutouts=2, progress=False,
                   extra_loss=keep_dark)
    assert calls and calls[0] == (2, 3, 16, 16)
    assert dark.history[-1]["extra"] < dark.history[0]["extra"]
    with pytest.raises(ValueError, match="prompts"):
        ct.tune(model, clip_model, z0, ["a", "b", "c"], steps=1, progress=False)
    with pytest.raises(ValueError, match="uint8"):
        ct.tune(model, clip_model, np.zeros((16, 16, 3), np.float32), "a", steps=1, progress=False)
