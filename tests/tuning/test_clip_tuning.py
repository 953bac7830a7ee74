import math

import numpy as np
import pytest
import torch

from kpnb.core import settings
from kpnb.core.images import to_model
from kpnb.evaluate import pose as pose_eval
from kpnb.evaluate import vq as vq_eval
from kpnb.models import attributes, pose_net, vq
from kpnb.models import clip as kc
from kpnb.poses import pose as kp
from kpnb.tuning import clip_tuning as ct

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


def test_tuning_log_ends_done(tiny_models, tmp_path, monkeypatch):
    # the last row is a step of the bar too: the log says "done", not "stopped" one short
    log = tmp_path / "progress.log"
    monkeypatch.setenv("KPNB_PROGRESS_LOG", str(log))
    monkeypatch.setenv("KPNB_PROGRESS_EVERY", "0")
    model, clip_model = tiny_models
    ct.tune(model, clip_model, _images(), "a girl with red hair", steps=3, cutouts=2, progress=True)
    last = log.read_text().strip().splitlines()[-1]
    assert "step 4/4 (100%)" in last and last.endswith("done"), last


def test_anchor_and_extra_loss(tiny_models):
    model, clip_model = tiny_models
    z0 = model.encode(to_model(_images())).detach()
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


def test_pose_keeping_loss():
    torch.manual_seed(0)
    est = pose_net.PoseNet(image_size=16, width=4).eval()
    poses = np.zeros((2, 17, 3), np.float32)
    poses[..., :2] = 0.5
    poses[..., 2] = kp.VISIBLE
    poses[1, :, 2] = kp.MISSING  # no counted joint: contributes nothing
    keep = ct.pose_keeping_loss(est, poses, weight=3.0)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    v = keep(x)
    assert v.ndim == 0 and torch.isfinite(v) and v > 0
    (g,) = torch.autograd.grad(v, [x])
    assert g[0].abs().sum() > 0 and g[1].abs().sum() == 0
    with pytest.raises(ValueError, match=r"\[N, 17, 3\]"):
        ct.pose_keeping_loss(est, np.zeros((2, 17, 2)))


def test_keeper_loss_holds_what_the_keeper_saw():
    """keeper_loss targets the keeper's own joints on the starting images: 0 there, > 0 once they change,
    and a conditioning pose with no visible joint counts nothing."""
    torch.manual_seed(1)
    keeper = pose_net.PoseNet(image_size=16, width=4).eval()
    ims = _images(3)
    poses = np.zeros((3, 17, 3), np.float32)
    poses[..., 2] = kp.VISIBLE
    poses[2, :, 2] = kp.MISSING
    loss = ct.keeper_loss(keeper, ims, poses, weight=2.0)
    x0 = torch.from_numpy(ims).permute(0, 3, 1, 2).float() / 255.0
    # (an untrained net's joints barely move, so the scale is small; what counts is 0 against > 0)
    assert float(loss(x0).detach()) < 1e-6 < 1e-4 < float(loss(1 - x0).detach())
    poses[:, :, 2] = kp.MISSING
    assert float(ct.keeper_loss(keeper, ims, poses)(1 - x0).detach()) == 0.0


def test_pose_region_mask_freezes_the_body_and_tuning_respects_it(tiny_models):
    pose = np.zeros((1, 17, 3), np.float32)
    pose[0, :, 2] = kp.MISSING
    for j, (x, y) in {5: (0.3, 0.3), 7: (0.3, 0.6), 0: (0.5, 0.1)}.items():  # left shoulder-elbow, nose
        pose[0, j] = (x, y, kp.VISIBLE)
    m = ct.pose_region_mask(pose, 8)
    assert m.shape == (1, 1, 8, 8) and set(m.unique().tolist()) == {0.0, 1.0}
    # the upper arm runs down x = 0.3 (cell 2) from y = 0.3 to 0.6: frozen; far right and the nose are free
    assert m[0, 0, 3, 2] == 0 and m[0, 0, 4, 2] == 0 and m[0, 0, 4, 7] == 1 and m[0, 0, 0, 4] == 1
    empty = np.zeros((1, 17, 3), np.float32)  # no joints: nothing frozen
    assert ct.pose_region_mask(empty, 8).all()

    model, clip_model = tiny_models
    ims = _images(1)
    z0 = model.encode(to_model(ims))
    mask = torch.ones(1, 1, *z0.shape[2:])
    mask[..., :, : z0.shape[3] // 2] = 0  # left half frozen
    res = ct.tune(model, clip_model, z0, "red hair", mask=mask, steps=5, lr=0.3, cutouts=2, progress=False)
    zq0 = model.quantize(z0.clamp(*ct.codebook_range(model)))[0]
    left = (res.latent - zq0)[..., : z0.shape[3] // 2].abs().max()
    right = (res.latent - zq0)[..., z0.shape[3] // 2:].abs().max()
    assert left == 0 and right > 0
    with pytest.raises(ValueError, match="mask must be"):
        ct.tune(model, clip_model, z0, "red hair", mask=torch.ones(1, 1, 3, 3), steps=1, progress=False)


def test_measure():
    torch.manual_seed(0)
    est = pose_net.PoseNet(image_size=16, width=4).eval()
    attr = attributes.AttributeNet({"hair_colour": ["red", "blue"]}, width=8, depth=1).eval()
    poses = np.zeros((2, 17, 3), np.float32)
    poses[..., :2], poses[..., 2] = 0.5, kp.VISIBLE
    m = ct.measure(_images(), poses, est, attr, ("hair_colour", "red"))
    assert 0 <= m["pck@0.1"] <= 1 and 0 <= m["rate"] <= 1 and 0 < m["prob"] < 1 and m["saturation"] > 0
    with pytest.raises(ValueError, match="not one the classifier knows"):
        ct.measure(_images(), poses, est, attr, ("hair_colour", "teal"))
    # two draws: each half measured alone, the whole the mean of the halves (equal halves)
    ims, poses4 = np.concatenate([_images(), _images()[::-1]]), np.concatenate([poses, poses])
    m2 = ct.measure(ims, poses4, est, attr, ("hair_colour", "red"), draws=2)
    halves = [ct.measure(ims[i:i + 2], poses4[i:i + 2], est, attr, ("hair_colour", "red")) for i in (0, 2)]
    assert m2["rate.draws"] == [h["rate"] for h in halves] and m2["pck@0.1.draws"] == [h["pck@0.1"] for h in halves]
    assert m2["rate"] == pytest.approx(np.mean(m2["rate.draws"]))
    assert "rate.draws" not in m
    with pytest.raises(ValueError, match="cannot make 3 draws"):
        ct.measure(_images(), poses, est, draws=3)


def test_head_region_mask_frees_only_the_head():
    pose = np.zeros((1, 17, 3), np.float32)
    pose[0, :, 2] = kp.MISSING
    pose[0, 0] = (0.5, 0.1, kp.VISIBLE)    # nose at the top centre
    pose[0, 15] = (0.5, 0.9, kp.VISIBLE)   # an ankle far below: not head, stays frozen
    m = ct.head_region_mask(pose, 16, radius=2.0)
    assert m.shape == (1, 1, 16, 16) and m[0, 0, 1, 8] == 1 and m[0, 0, 14, 8] == 0 and m[0, 0, 1, 1] == 0
    assert 4 < m.sum() < 40


def test_region_mask_kinds_scale_with_the_latent():
    pose = np.zeros((1, 17, 3), np.float32)
    pose[0, :, 2] = kp.MISSING
    pose[0, 0] = (0.5, 0.1, kp.VISIBLE)
    pose[0, 11] = (0.5, 0.6, kp.VISIBLE)   # a hip, so the body mask has something to freeze
    head16, head8 = (ct.region_mask("head", pose, n, head_radius=0.125) for n in (16, 8))
    assert torch.equal(head16, ct.head_region_mask(pose, 16, radius=2.0))
    # the same share of the image is freed at f4 and f8 sizes (within the coarser grid's rounding)
    assert abs(head16.mean() - head8.mean()) < 0.05
    assert torch.equal(ct.region_mask("body", pose, 8), ct.pose_region_mask(pose, 8))
    assert ct.region_mask("none", pose, 8) is None
    with pytest.raises(ValueError, match="unknown mask kind 'face'"):
        ct.region_mask("face", pose, 8)


def _poses(n=2):
    poses = np.zeros((n, 17, 3), np.float32)
    poses[..., :2] = np.random.default_rng(1).uniform(0.2, 0.8, (n, 17, 2))
    poses[..., 2] = kp.VISIBLE
    return poses


def test_settings_from_a_preset_section_and_keyword_overrides(tiny_models):
    sec = settings.preset_config("smoke")["clip"]
    head = ct.TuneSettings.from_config(sec, "head")
    assert (head.steps, head.lr, head.cutouts, head.seed) == (sec["tune_steps"], sec["tune_lr"], sec["cutouts"], sec["seed"])
    assert head.anchor_weight == sec["head_anchor"]
    assert ct.TuneSettings.from_config(sec, "body").anchor_weight == 0.0
    assert ct.TuneSettings.from_config(sec, "none").anchor_weight == sec["anchor_weight"]
    with pytest.raises(ValueError, match="unknown mask kind"):
        ct.TuneSettings.from_config(sec, "face")
    # a keyword overrides the settings' field; the same tuning either way
    model, clip_model = tiny_models
    a = ct.tune(model, clip_model, _images(), "red hair", ct.TuneSettings(steps=3, cutouts=2), progress=False)
    b = ct.tune(model, clip_model, _images(), "red hair", ct.TuneSettings(steps=9), steps=3, cutouts=2, progress=False)
    assert np.array_equal(a.image, b.image) and [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    with pytest.raises(TypeError):
        ct.tune(model, clip_model, _images(), "red hair", stop_at=0.5, progress=False)


def test_tune_samples_is_tune_with_the_presets_mask_anchor_and_keeper(tiny_models):
    model, clip_model = tiny_models
    sec = {**settings.preset_config("smoke")["clip"], "tune_steps": 3, "cutouts": 2, "head_radius": 0.25}
    ims, poses = _images(), _poses()
    torch.manual_seed(1)
    keeper = pose_net.PoseNet(image_size=16, width=4).eval()
    recon, _ = vq_eval.reconstruct(model, ims)
    got = ct.tune_samples(model, clip_model, ims, poses, "red hair", sec, "head", keeper=keeper, recon=recon,
                          progress=False)
    with torch.no_grad():
        z0 = model.encode(to_model(ims))
    want = ct.tune(model, clip_model, z0, "red hair", ct.TuneSettings.from_config(sec, "head"),
                   mask=ct.region_mask("head", poses, z0.shape[-1], head_radius=0.25),
                   extra_loss=ct.keeper_loss(keeper, recon, poses, sec["pose_weight"]), progress=False)
    assert np.array_equal(got.image, want.image) and torch.equal(got.latent, want.latent)
    assert [r["extra"] for r in got.history] == [r["extra"] for r in want.history]
    # the reconstructions are made when not given
    again = ct.tune_samples(model, clip_model, ims, poses, "red hair", sec, "head", keeper=keeper, progress=False)
    assert np.array_equal(again.image, got.image)
    plain = ct.tune_samples(model, clip_model, ims, poses, "red hair", sec, "none", progress=False)
    assert "extra" not in plain.history[-1]


def test_prompts_best_spec_and_metrics():
    assert ct.tuning_prompts("light_blue", ["colorful", "a big smile"]) == {
        "light_blue_hair": "a girl with light blue hair", "colorful": "colorful", "a_big_smile": "a big smile"}
    before = {"f4": {"pck@0.1": 0.8, "rate": 0.2, "saturation": 0.3, "keeper_pck@0.1": 0.9},
              "f8": {"pck@0.1": 0.7, "rate": 0.3, "saturation": 0.4, "keeper_pck@0.1": 0.8}}
    after = {("f4", "red_hair"): {"pck@0.1": 0.6, "rate": 0.95, "saturation": 0.5, "keeper_pck@0.1": 0.85},
             ("f8", "red_hair"): {"pck@0.1": 0.65, "rate": 0.8, "saturation": 0.6, "keeper_pck@0.1": 0.75}}
    # f4: rate 0.95 but a drop of 0.2, 0.1 past the target: 0.95 - 1.0; f8: drop 0.05: 0.8
    assert ct.pick_best_spec(before, after, "red_hair") == "f8"
    after["f4", "red_hair"]["pck@0.1"] = 0.75
    assert ct.pick_best_spec(before, after, "red_hair") == "f4"
    results = {k: ct.TuneResult(image=np.zeros((2, 4, 4, 3), np.uint8), latent=torch.zeros(2, 1, 1, 1),
                                start_image=np.zeros((2, 4, 4, 3), np.uint8), clip_score_before=np.array([1.0, 2.0]),
                                clip_score_after=np.array([3.0, 5.0]), iterations_per_s=7.0) for k in after}
    m = ct.tuning_metrics({"pck@0.1": 0.9, "rate": 0.1, "saturation": 0.2, "prob": 0.3}, before, results, after,
                          "f4", {"none": {"rate": 0.5, "pck@0.1": 0.4, "saturation": 0.1}})
    assert m["samples.pck@0.1"] == 0.9 and "samples.prob" not in m
    assert m["f4.red_hair.clip_score_before"] == 1.5 and m["f4.red_hair.clip_score_after"] == 4.0
    assert m["f8.red_hair.rate_before"] == 0.3 and m["f8.red_hair.rate_after"] == 0.8
    assert m["f8.red_hair.pck@0.1_after"] == 0.65 and m["f8.red_hair.saturation_before"] == 0.4
    assert m["f4.red_hair.keeper_pck@0.1_before"] == 0.9 and m["f4.red_hair.keeper_pck@0.1_after"] == 0.85
    assert m["f4.red_hair.iterations_per_s"] == 7.0
    assert m["ablation.f4.none.rate_after"] == 0.5 and m["ablation.f4.none.pck@0.1_after"] == 0.4
    assert m["f4.red_hair.pck@0.1_drop"] == pytest.approx(0.05) and m["ablation.f4.none.pck@0.1_drop"] == 0.4
    assert len(m) == 3 + 2 * 12 + 3
    # draws and the edit's description
    before["f8"]["pck@0.1.draws"] = [0.6, 0.8]
    after["f8", "red_hair"].update({"pck@0.1.draws": [0.6, 0.7], "rate.draws": [0.75, 0.85]})
    m = ct.tuning_metrics(before["f4"], before, results, after,
                          edits={("f8", "red_hair"): {"high_freq_share": 0.3, "hair_colour.changed": 0.5}})
    assert m["f8.red_hair.pck@0.1_drop_draws"] == pytest.approx([0.0, 0.1])
    assert m["f8.red_hair.rate_after_draws"] == [0.75, 0.85] and "f4.red_hair.rate_after_draws" not in m
    assert m["f8.red_hair.edit.high_freq_share"] == 0.3 and m["f8.red_hair.edit.hair_colour.changed"] == 0.5
    for a in after.values():  # measured without a keeper: no keeper keys
        del a["keeper_pck@0.1"]
    assert not any("keeper" in k for k in ct.tuning_metrics(before["f4"], before, results, after))


def test_measure_with_a_keeper():
    torch.manual_seed(0)
    est = pose_net.PoseNet(image_size=16, width=4).eval()
    torch.manual_seed(1)
    keeper = pose_net.PoseNet(image_size=16, width=4).eval()
    ims, poses = _images(), _poses()
    m = ct.measure(ims, poses, est, keeper=keeper)
    assert m["keeper_pck@0.1"] == pose_eval.pck(pose_net.predict(keeper, ims), poses)["pck@0.1"]
    assert m["pck@0.1"] == pose_eval.pck(pose_net.predict(est, ims), poses)["pck@0.1"] and "rate" not in m
    assert "keeper_pck@0.1" not in ct.measure(ims, poses, est)
