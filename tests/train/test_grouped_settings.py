"""Settings grouped into dataclasses and mappings: the grouped form builds what the keywords built, and a
misspelt setting is refused rather than ignored."""
import math

import numpy as np
import pytest
import torch

from kpnb.diffusion import ldm
from kpnb.diffusion.schedule import Schedule
from kpnb.evaluate import pose as pose_eval
from kpnb.models import clip as kc
from kpnb.models import transformer as T
from kpnb.models.pose_net import PoseNet
from kpnb.poses.pose import VISIBLE
from kpnb.synth import dataset
from kpnb.train import attributes as attribute_training
from kpnb.train import clip as clip_training
from kpnb.train import loop as training


def _poses(n, seed=0):
    rng = np.random.default_rng(seed)
    p = np.zeros((n, 17, 3), np.float32)
    p[..., :2] = rng.uniform(0.1, 0.9, (n, 17, 2))
    p[..., 2] = VISIBLE
    return p


def test_make_ldm_from_an_arch_or_its_fields_is_the_same_model():
    arch = ldm.LDMArch(base=16, mults=(1, 2), num_res_blocks=1, attn_ds=(2,), heads=2, token_dim=16, prediction="v")
    torch.manual_seed(0)
    a = ldm.make_ldm("tokens+skeleton", (3, 8, 8), arch, scale_factor=0.5)
    torch.manual_seed(0)
    b = ldm.make_ldm("tokens+skeleton", (3, 8, 8), base=16, mults=(1, 2), num_res_blocks=1, attn_ds=(2,), heads=2,
                     token_dim=16, prediction="v", scale_factor=0.5)
    assert a.config() == b.config() and a.prediction == "v" and a.scale_factor == 0.5
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    # a keyword replaces the arch's field; the schedule defaults to ldm's
    c = ldm.make_ldm("grid", (3, 8, 8), arch, base=8)
    assert c.unet.cfg.base == 8 and c.unet.cfg.mults == (1, 2)
    assert c.schedule.config() == Schedule().config()
    assert ldm.make_ldm("grid", (3, 8, 8), arch, schedule=Schedule(T=10)).schedule.T == 10
    with pytest.raises(TypeError):
        ldm.make_ldm("grid", (3, 8, 8), bse=8)


def test_domain_clip_config_from_an_arch_or_its_fields():
    assert kc.domain_clip_config(kc.DomainClipArch(image_size=32, width=32)) == kc.domain_clip_config(image_size=32,
                                                                                                    width=32)
    d = kc.domain_clip_config()
    assert d["embed_dim"] == 64 and d["init_logit_scale"] == pytest.approx(math.log(30.0))
    assert d["vision_cfg"]["image_size"] == 64 and d["text_cfg"]["heads"] == 2
    with pytest.raises(ValueError, match="multiple of patch_size"):
        kc.domain_clip_config(image_size=30)
    with pytest.raises(TypeError):
        kc.domain_clip_config(layer=3)


def test_sample_codes_takes_a_seed_or_a_generator():
    torch.manual_seed(0)
    m = T.make_transformer({"n_layer": 1, "n_head": 2, "n_embd": 16, "dropout": 0.0}, n_codes=8,
                           latent_size=(2, 2)).eval()
    p = _poses(2)
    assert torch.equal(T.sample_codes(m, p, seed=5), T.sample_codes(m, p, seed=torch.Generator().manual_seed(5)))
    g = torch.Generator().manual_seed(5)
    first = T.sample_codes(m, p, seed=g)
    assert not torch.equal(first, T.sample_codes(m, p, seed=g))  # the generator goes on where it stopped


def test_pose_fidelity_passes_the_batch_size_to_the_sampler_only_when_given():
    seen = []

    def sampler(model, vq, poses, **kw):
        seen.append(kw)
        return np.zeros((len(poses), 32, 32, 3), np.uint8)

    est = PoseNet(image_size=32, width=4)
    pose_eval.pose_fidelity(None, None, est, _poses(2), sampler=sampler, seed=3, guidance=2.0)
    pose_eval.pose_fidelity(None, None, est, _poses(2), sampler=sampler, batch_size=7)
    assert seen == [{"seed": 3, "guidance": 2.0}, {"seed": 0, "batch_size": 7}]


def test_trainers_refuse_settings_they_would_ignore(tmp_path):
    ims = np.zeros((4, 32, 32, 3), np.uint8)
    with pytest.raises(ValueError, match="unknown setting.*stpes"):
        attribute_training.train_attribute_classifier(ims, {"hair": ["red"] * 4}, {"hair": ["red", "blue"]},
                                                      tmp_path / "a", {"stpes": 3}, progress=False)
    with pytest.raises(KeyError, match="steps"):
        clip_training.train_domain_clip(ims, ["a"] * 4, {"batch_size": 4}, tmp_path / "c", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_loop_settings_are_the_loop_defaults():
    s = training.LoopSettings(steps=5, ckpt_dir="x")
    assert (s.batch_size, s.ckpt_every, s.log_every, s.seed, s.desc, s.resume, s.progress) == (
        1, 500, 10, 0, "train", True, True)


def test_write_dataset_settings(tmp_path):
    with pytest.raises(TypeError):
        dataset.write_dataset(tmp_path / "a", 2, imagesize=16, progress=False)
    with pytest.raises(ValueError, match="distractor_frac"):
        dataset.write_dataset(tmp_path / "b", 2, distractor_frac=1.5, progress=False)
    rec = dataset.SynthSettings(3, image_size=16, seed=2).record()
    assert (rec["n"], rec["image_size"], rec["render_size"], rec["seed"], rec["distractor_frac"]) == (3, 16, 256, 2, 0.4)
    s = dataset.write_dataset(tmp_path / "c", 3, image_size=16, render_size=32, seed=2, workers=1, progress=False)
    assert s["n"] == 3 and not s["skipped"]
    assert dataset.write_dataset(tmp_path / "c", 3, image_size=16, render_size=32, seed=2, workers=1,
                                 progress=False)["skipped"]
