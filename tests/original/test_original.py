"""Importing the original checkpoints (kpnb.original.ldm): Lightning-like files at tiny widths with the original
key layouts, outputs against an independent taming-style reference, EMA choice, schedule and scale_factor,
and pickles that would run code (refused, nothing runs) or name Lightning classes (inert placeholders).

The VQGAN state dicts here are NOT made through kpnb's mapping: :func:`taming_vq_state` writes every key as
taming-transformers' Encoder/Decoder/VQModel constructors name them, and :func:`taming_encode` /
:func:`taming_decode` run them by those names, so a wrong mapping shows as a wrong output."""
from __future__ import annotations

import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kpnb.core.files import UnsafeFileError
from kpnb.diffusion import ldm as D
from kpnb.diffusion import sampling
from kpnb.models import vq as V
from kpnb.original import common as original_common
from kpnb.original import ldm as O
from kpnb.original import lightning as lightning_ckpt
from kpnb.original import vq as original_vq

from helpers import UCFG, exported_checkpoint

CH, MULT, NRB, Z, NE = 64, (1, 2), 2, 3, 32  # taming's ch, ch_mult, num_res_blocks, z_channels=embed_dim, n_embed


# ---- an independent taming-layout VQGAN -----------------------------------------------------------------
def taming_vq_state(ch=CH, ch_mult=MULT, nrb=NRB, z=Z, n_embed=NE, seed=0, loss=True, meta=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.empty(*s, device="meta") if meta else torch.randn(*s, generator=g)  # noqa: E731
    sd = {}

    def conv(name, cin, cout, k):
        sd[f"{name}.weight"] = r(cout, cin, k, k) / math.sqrt(cin * k * k)
        sd[f"{name}.bias"] = 0.1 * r(cout)

    def norm(name, c):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = 1 + 0.1 * r(c), 0.1 * r(c)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def mid(side, c):
        res(f"{side}.mid.block_1", c, c)
        norm(f"{side}.mid.attn_1.norm", c)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{side}.mid.attn_1.{p}", c, c, 1)
        res(f"{side}.mid.block_2", c, c)

    L, in_mult = len(ch_mult), (1,) + tuple(ch_mult)
    conv("encoder.conv_in", 3, ch, 3)
    for i in range(L):
        bi, bo = ch * in_mult[i], ch * ch_mult[i]
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", bi, bo)
            bi = bo
        if i != L - 1:
            conv(f"encoder.down.{i}.downsample.conv", bi, bi, 3)
    mid("encoder", bi)
    norm("encoder.norm_out", bi), conv("encoder.conv_out", bi, z, 3)
    conv("quant_conv", z, z, 1)
    sd["quantize.embedding.weight"] = r(n_embed, z)
    conv("post_quant_conv", z, z, 1)
    bi = ch * ch_mult[-1]
    conv("decoder.conv_in", z, bi, 3)
    mid("decoder", bi)
    for i in reversed(range(L)):
        bo = ch * ch_mult[i]
        for j in range(nrb + 1):
            res(f"decoder.up.{i}.block.{j}", bi, bo)
            bi = bo
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", bi, bi, 3)
    norm("decoder.norm_out", bi), conv("decoder.conv_out", bi, 3, 3)
    if loss:  # what a taming training checkpoint also holds
        sd["loss.discriminator.main.0.weight"], sd["loss.discriminator.main.0.bias"] = r(8, 3, 4, 4), r(8)
        sd["loss.perceptual_loss.net.slice1.0.weight"] = r(4, 3, 3, 3)
        sd["loss.perceptual_loss.lin0.model.1.weight"] = r(1, 4, 1, 1)
    return sd


def _conv(sd, name, x, stride=1, pad=None):
    w = sd[f"{name}.weight"]
    return F.conv2d(x, w, sd[f"{name}.bias"], stride, w.shape[-1] // 2 if pad is None else pad)


def _norm_act(sd, name, x):
    return F.silu(F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6))


def _res(sd, name, x):
    h = _conv(sd, f"{name}.conv1", _norm_act(sd, f"{name}.norm1", x))
    h = _conv(sd, f"{name}.conv2", _norm_act(sd, f"{name}.norm2", h))
    return (_conv(sd, f"{name}.nin_shortcut", x) if f"{name}.nin_shortcut.weight" in sd else x) + h


def _attn(sd, name, x):
    h = F.group_norm(x, 32, sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"], eps=1e-6)
    q, k, v = (_conv(sd, f"{name}.{p}", h) for p in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    w = torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c ** -0.5
    out = torch.bmm(v.reshape(b, c, -1), w.softmax(2).permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, f"{name}.proj_out", out)


def _mid(sd, side, h):
    return _res(sd, f"{side}.mid.block_2", _attn(sd, f"{side}.mid.attn_1", _res(sd, f"{side}.mid.block_1", h)))


def taming_encode(sd, x, L=len(MULT), nrb=NRB):
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(L):
        for j in range(nrb):
            h = _res(sd, f"encoder.down.{i}.block.{j}", h)
        if i != L - 1:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, pad=0)
    h = _conv(sd, "encoder.conv_out", _norm_act(sd, "encoder.norm_out", _mid(sd, "encoder", h)))
    return _conv(sd, "quant_conv", h)


def taming_quantize(sd, h):
    e = sd["quantize.embedding.weight"]
    b, c, hh, ww = h.shape
    z = h.permute(0, 2, 3, 1).reshape(-1, c)
    idx = (z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()).argmin(1)
    return e[idx].reshape(b, hh, ww, c).permute(0, 3, 1, 2), idx.reshape(b, hh, ww)


def taming_decode(sd, zq, L=len(MULT), nrb=NRB):
    h = _mid(sd, "decoder", _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", zq)))
    for i in reversed(range(L)):
        for j in range(nrb + 1):
            h = _res(sd, f"decoder.up.{i}.block.{j}", h)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return _conv(sd, "decoder.conv_out", _norm_act(sd, "decoder.norm_out", h))


def lightning(state, **extra):
    """A dict shaped like a PyTorch Lightning checkpoint."""
    return {"epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.4.2", "state_dict": state,
            "callbacks": {"ModelCheckpoint": {"best_model_score": torch.tensor(0.25), "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}],
            "lr_schedulers": [], **extra}


def save(obj, path, **kw):
    torch.save(obj, path, **kw)
    return path


# ---- the VQGAN ----------------------------------------------------------------------------------------
def test_reference_layout_has_the_literal_taming_names():
    """Guards the hand-written generator itself with names and shapes read off taming's constructors."""
    sd = taming_vq_state()
    want = {"encoder.conv_in.weight": (64, 3, 3, 3), "encoder.down.0.block.0.norm1.weight": (64,),
            "encoder.down.0.block.1.conv2.bias": (64,), "encoder.down.0.downsample.conv.weight": (64, 64, 3, 3),
            "encoder.down.1.block.0.nin_shortcut.weight": (128, 64, 1, 1), "encoder.mid.attn_1.q.weight":
            (128, 128, 1, 1), "encoder.mid.attn_1.proj_out.bias": (128,), "encoder.conv_out.weight": (3, 128, 3, 3),
            "quant_conv.weight": (3, 3, 1, 1), "quantize.embedding.weight": (32, 3), "post_quant_conv.bias": (3,),
            "decoder.conv_in.weight": (128, 3, 3, 3), "decoder.mid.block_1.conv1.weight": (128, 128, 3, 3),
            "decoder.up.1.block.0.conv1.weight": (128, 128, 3, 3), "decoder.up.1.block.2.conv2.weight":
            (128, 128, 3, 3), "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
            "decoder.up.0.block.0.nin_shortcut.weight": (64, 128, 1, 1), "decoder.up.0.block.2.conv2.weight":
            (64, 64, 3, 3), "decoder.norm_out.bias": (64,), "decoder.conv_out.weight": (3, 64, 3, 3)}
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.1.downsample.conv.weight" not in sd


def test_vq_import_maps_every_key_and_matches_the_reference(tmp_path, capsys):
    sd = taming_vq_state()
    path = save(lightning(sd), tmp_path / "last.ckpt")
    vq = original_vq.load_original_vq(path, image_size=16)
    printed = capsys.readouterr().out
    rep = vq.import_report
    assert "left over (unused): 4 keys" in printed and "missing: 0" in printed
    model_keys = {k for k in sd if not k.startswith("loss.")}
    assert set(rep.mapped) == model_keys and not rep.missing
    assert set(rep.unused) == {k for k in sd if k.startswith("loss.")}
    assert "discriminator" in rep.unused["loss.discriminator.main.0.weight"]
    assert "LPIPS" in rep.unused["loss.perceptual_loss.lin0.model.1.weight"]
    assert rep.meta["epoch"] == 3 and rep.meta["global_step"] == 10
    c = vq.cfg
    assert (c.base_width, c.channel_mult, c.res_blocks, c.dec_res_blocks, c.latent_channels, c.n_codes, c.factor,
            c.stem, c.mid_attention, c.quant_conv) == (64, (1, 2), 2, 3, 3, 32, 2, 1, True, True)
    assert not vq.training and bool(vq.quantizer.initialized)
    rep_names = {rep.mapped[f"encoder.mid.attn_1.{p}.weight"] for p in "qkv"}
    assert rep_names == {"encoder.mid.1.qkv.weight"}  # the one concatenation
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        h_ref = taming_encode(sd, x)
        zq_ref, idx_ref = taming_quantize(sd, h_ref)
        rec_ref = taming_decode(sd, zq_ref)
        h = vq.encode(x)
        zq, idx, _ = vq.quantize(h)
        rec = vq.decode(zq)
    torch.testing.assert_close(h, h_ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(idx, idx_ref)
    torch.testing.assert_close(rec, rec_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vq.decode_indices(idx), rec_ref, atol=1e-4, rtol=1e-4)
    # the inverse mapping gives back exactly the original keys and tensors
    back = original_vq.vq_state_to_original(vq)
    assert set(back) == model_keys
    for k in model_keys:
        assert torch.equal(back[k], sd[k]), k


def test_full_size_layouts_are_recognised():
    """The released sizes (shapes only, on the meta device): vq-f4 Danbooru and the keypoint UNet."""
    sd = taming_vq_state(ch=128, ch_mult=(1, 2, 4), nrb=2, z=3, n_embed=8192, loss=False, meta=True)
    cfg = original_vq.vq_config_from_state(sd)
    assert cfg == V.VQConfig(**{**V.GPU_MODELS["f4"], "quant_conv": True})
    with torch.device("meta"):
        model = V.VQModel(cfg)
        unet = D.original_ldm().unet
    assert {s for srcs in original_vq.vq_key_map(model).values() for s in srcs} == set(sd)
    assert all(m.num_groups == 32 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert O.unet_config_from_state(unet.state_dict(), heads=8) == D.UNetConfig.original()


def test_vq_bare_state_dict_and_legacy_format(tmp_path):
    sd = taming_vq_state(loss=False)
    path = save(sd, tmp_path / "bare.pt", _use_new_zipfile_serialization=False)
    vq = original_vq.load_original_vq(path, image_size=16, verbose=False)
    assert set(vq.import_report.mapped) == set(sd) and not vq.import_report.unused


def test_vq_layouts_kpnb_cannot_represent_are_refused(tmp_path):
    sd = taming_vq_state(loss=False)
    level_attn = {**sd, "encoder.down.1.attn.0.q.weight": torch.zeros(128, 128, 1, 1)}
    with pytest.raises(O.CheckpointImportError, match="attention"):
        original_vq.load_original_vq(save(lightning(level_attn), tmp_path / "a.ckpt"), verbose=False)
    narrow = taming_vq_state(ch=32, loss=False)  # kpnb's GroupNorm would take 16 groups at width 32
    with pytest.raises(O.CheckpointImportError, match="GroupNorm"):
        original_vq.load_original_vq(save(lightning(narrow), tmp_path / "b.ckpt"), verbose=False)
    stray = {**sd, "decoder.extra.weight": torch.zeros(1)}
    with pytest.raises(O.CheckpointImportError, match="decoder.extra.weight"):
        original_vq.load_original_vq(save(lightning(stray), tmp_path / "c.ckpt"), verbose=False)
    wrong = {**sd, "decoder.up.0.block.1.conv1.weight": torch.zeros(64, 64, 1, 1)}
    with pytest.raises(O.CheckpointImportError, match=r"decoder.up.0.block.1.conv1.weight.*decoder.up.5.conv1"):
        original_vq.load_original_vq(save(lightning(wrong), tmp_path / "d.ckpt"), verbose=False)


def test_missing_files_say_what_to_download_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"VQGAN f4.*data/checkpoints/original_vq_f4.ckpt"):
        original_vq.load_original_vq(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match=r"latent-diffusion.*data/checkpoints/original_ldm_keypoints.ckpt"):
        O.load_original_ldm(tmp_path / "nope.ckpt")


# ---- the latent-diffusion model -----------------------------------------------------------------------
def ldm_schedule(T=1000, start=0.0015, end=0.0195, sqrt_linear=True):
    """ldm's register_schedule buffers: computed in float64 by numpy, stored as float32."""
    b = np.linspace(start ** 0.5, end ** 0.5, T) ** 2 if sqrt_linear else np.linspace(start, end, T)
    ac = np.cumprod(1 - b)
    ac_prev = np.append(1.0, ac[:-1])
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {"betas": f(b), "alphas_cumprod": f(ac), "alphas_cumprod_prev": f(ac_prev),
            "sqrt_alphas_cumprod": f(np.sqrt(ac)), "sqrt_one_minus_alphas_cumprod": f(np.sqrt(1 - ac)),
            "posterior_variance": f(b * (1 - ac_prev) / (1 - ac))}


def ldm_state(scale_factor=None, ema=True, **sched):
    """(state dict in latent-diffusion's layout, plain UNet weights, EMA UNet weights)."""
    torch.manual_seed(0)
    u = D.UNet(D.UNetConfig(**UCFG))
    with torch.no_grad():
        for p in u.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = {k: v.clone() for k, v in u.state_dict().items()}
    ema_w = {k: v + 0.02 * torch.randn_like(v) for k, v in plain.items()}
    sd = {f"model.diffusion_model.{k}": v for k, v in plain.items()}
    if ema:
        sd.update({f"model_ema.diffusion_model{k.replace('.', '')}": v for k, v in ema_w.items()})
        sd.update({"model_ema.decay": torch.tensor(0.9999),
                   "model_ema.num_updates": torch.tensor(1234, dtype=torch.int32)})
    sd.update({f"first_stage_model.{k}": v for k, v in taming_vq_state(loss=False).items()})
    sd.update(ldm_schedule(**sched))
    if scale_factor is not None:
        sd["scale_factor"] = torch.tensor(scale_factor)
    return sd, plain, ema_w


def test_ldm_layout_literal_names():
    sd, _, _ = ldm_state()
    assert sd["model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"].shape == (64, 17)
    assert sd["model_ema.diffusion_modelinput_blocks31transformer_blocks0attn2to_kweight"].shape == (64, 17)
    assert sd["model.diffusion_model.output_blocks.1.2.conv.weight"].shape == (64, 64, 3, 3)  # the upsample
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in sd
    assert "first_stage_model.quantize.embedding.weight" in sd


def _eps(unet_weights, x, t, ctx):
    u = D.UNet(D.UNetConfig(**UCFG)).eval()
    u.load_state_dict(unet_weights)
    with torch.no_grad():
        return u(x, t, ctx)


def test_ldm_import_ema_schedule_scale_and_first_stage(tmp_path):
    sd, plain, ema_w = ldm_state(scale_factor=0.5)
    path = save(lightning(sd), tmp_path / "ldm.ckpt")
    ldm, vq = O.load_original_ldm(path, heads=2, image_size=16, verbose=False)
    assert ldm.unet.cfg == D.UNetConfig(**UCFG) and ldm.latent_shape == (3, 8, 8) and ldm.cond.modes == ("grid",)
    assert ldm.scale_factor == 0.5 and ldm.schedule.T == 1000 and not ldm.training
    rep = ldm.import_report
    assert rep.meta["weights"] == "EMA"
    assert set(rep.missing) == {"cond.null_grid"} and "guidance" in rep.missing["cond.null_grid"]  # kpnb-only
    ema_keys = {k for k in sd if k.startswith("model_ema.diffusion_model")}
    assert ema_keys <= set(rep.mapped) and {k for k in sd if k.startswith("first_stage_model.")} <= set(rep.mapped)
    assert all("non-EMA" in rep.unused[k] for k in sd if k.startswith("model.diffusion_model."))
    assert set(rep.unused) == {k for k in sd if k.startswith("model.diffusion_model.")} | {"model_ema.decay",
                                                                                           "model_ema.num_updates"}
    assert set(rep.mapped) | set(rep.unused) == set(sd)  # every key accounted for
    assert any("schedule checked" in n for n in rep.notes) and any("0.5" in n for n in rep.notes)
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([5, 700]), torch.rand(2, 1, 17, generator=g) * 1023
    with torch.no_grad():
        got = ldm.unet(x, t, ctx)
    torch.testing.assert_close(got, _eps(ema_w, x, t, ctx))
    assert not torch.allclose(got, _eps(plain, x, t, ctx))
    # the first stage is the checkpoint's VQGAN
    img = torch.rand(1, 3, 16, 16) * 2 - 1
    vq_sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
    with torch.no_grad():
        torch.testing.assert_close(vq.encode(img), taming_encode(vq_sd, img), atol=1e-4, rtol=1e-4)
    # sampling runs end to end at guidance 1 (the original had no null pose)
    poses = torch.rand(1, 17, 3)
    poses[..., 2] = 2
    out = sampling.ddim_sample(ldm, poses, steps=2, seed=0)
    assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()


def test_ldm_non_ema_and_defaults(tmp_path):
    sd, plain, _ = ldm_state()
    ldm, _ = O.load_original_ldm(save(lightning(sd), tmp_path / "l.ckpt"), ema=False, heads=2, image_size=16,
                                 verbose=False)
    g = torch.Generator().manual_seed(3)
    x, t, ctx = torch.randn(1, 3, 8, 8, generator=g), torch.tensor([300]), torch.rand(1, 1, 17, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ldm.unet(x, t, ctx), _eps(plain, x, t, ctx))
    rep = ldm.import_report
    assert rep.meta["weights"] == "non-EMA" and ldm.scale_factor == 1.0
    assert any("scale_factor 1.0" in n for n in rep.notes)
    assert all("EMA UNet weights" in rep.unused[k] for k in sd if k.startswith("model_ema.diffusion_model"))
    # no EMA in the file: ema=True falls back to the plain weights and says so
    sd2, plain2, _ = ldm_state(ema=False)
    ldm2, _ = O.load_original_ldm(save(lightning(sd2), tmp_path / "m.ckpt"), heads=2, image_size=16, verbose=False)
    assert ldm2.import_report.meta["weights"] == "non-EMA"
    assert any("no EMA" in n for n in ldm2.import_report.notes)


def test_ldm_schedule_other_than_ldm_linear_is_refused(tmp_path):
    sd, _, _ = ldm_state(sqrt_linear=False)
    with pytest.raises(O.CheckpointImportError, match="schedule"):
        O.load_original_ldm(save(lightning(sd), tmp_path / "s.ckpt"), heads=2, image_size=16, verbose=False)
    sd, _, _ = ldm_state(start=0.00085, end=0.012)  # sqrt-linear with other ends: representable
    ldm, _ = O.load_original_ldm(save(lightning(sd), tmp_path / "t.ckpt"), heads=2, image_size=16, verbose=False)
    assert abs(ldm.schedule.beta_start - 0.00085) < 1e-9 and abs(ldm.schedule.beta_end - 0.012) < 1e-9


# ---- pickles: placeholders and refusals ----------------------------------------------------------------
@pytest.fixture
def fake_lightning(monkeypatch, tmp_path):
    """Classes and a function that claim to live in pytorch_lightning; each touches a marker if ever called."""
    marker = tmp_path / "lightning_code_ran"
    mods = {n: types.ModuleType(n) for n in ("pytorch_lightning", "pytorch_lightning.callbacks",
                                              "pytorch_lightning.callbacks.model_checkpoint",
                                              "pytorch_lightning.utilities", "pytorch_lightning.utilities.parsing")}

    class ModelCheckpoint:
        def __init__(self, *a, **k):
            marker.touch()

        def __setstate__(self, state):
            marker.touch()

    class AttributeDict(dict):
        def __setitem__(self, k, v):
            marker.touch()

    def run(arg):
        marker.touch()

    for obj, mod in ((ModelCheckpoint, "pytorch_lightning.callbacks.model_checkpoint"),
                     (AttributeDict, "pytorch_lightning.utilities.parsing"), (run, "pytorch_lightning.utilities")):
        obj.__module__, obj.__qualname__ = mod, obj.__name__
        setattr(mods[mod], obj.__name__, obj)
    for n, m in mods.items():
        monkeypatch.setitem(sys.modules, n, m)

    class CallsRun:  # unpickling it would call pytorch_lightning.utilities.run("...")
        def __reduce__(self):
            return (run, ("touch it",))

    return types.SimpleNamespace(marker=marker, ModelCheckpoint=ModelCheckpoint, AttributeDict=AttributeDict,
                                 CallsRun=CallsRun)


def test_lightning_metadata_becomes_inert_placeholders(tmp_path, fake_lightning):
    fl = fake_lightning
    inst = fl.ModelCheckpoint.__new__(fl.ModelCheckpoint)
    inst.__dict__.update(monitor="val/loss", best_k=3)
    hp = dict.__new__(fl.AttributeDict)
    dict.__setitem__(hp, "lr", 2e-6)
    sd = taming_vq_state(loss=False)
    ck = lightning(sd, callbacks={fl.ModelCheckpoint: {"best_model_score": torch.tensor(0.1),
                                                       "current_score": np.float64(0.2)}},
                   hyper_parameters=hp, trainer_state=inst, hook=fl.CallsRun())
    path = save(ck, tmp_path / "meta.ckpt")
    got = original_common.load_lightning_checkpoint(path)
    assert not fl.marker.exists()  # nothing of the "real" classes ran
    assert set(got.placeholders) == {"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                                     "pytorch_lightning.utilities.run"}
    (key,) = got.raw["callbacks"]
    assert issubclass(key, lightning_ckpt.LightningPlaceholder) and key is not fl.ModelCheckpoint
    assert key.original == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert float(got.raw["callbacks"][key]["current_score"]) == 0.2
    assert type(got.raw["hyper_parameters"]) is dict and got.raw["hyper_parameters"] == {"lr": 2e-6}
    assert isinstance(got.raw["trainer_state"], lightning_ckpt.LightningPlaceholder)
    assert got.raw["trainer_state"].state == {"monitor": "val/loss", "best_k": 3}
    assert got.raw["hook"].args == ("touch it",) and "inert placeholder" in repr(got.raw["hook"])
    vq = original_vq.load_original_vq(path, image_size=16, verbose=False)
    assert any("placeholders" in n for n in vq.import_report.notes) and not fl.marker.exists()


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("payload, name", [(_System, "system"), (_Eval, "builtins.eval")])
def test_code_running_pickles_are_refused_and_never_run(tmp_path, payload, name):
    marker = tmp_path / "pwned"
    sd = taming_vq_state(loss=False)
    for i, where in enumerate(("callbacks", "state_dict")):
        ck = lightning(dict(sd))
        if where == "callbacks":
            ck["callbacks"] = {"ModelCheckpoint": {"x": payload(marker)}}
        else:
            ck["state_dict"]["encoder.conv_in.weight"] = payload(marker)
        path = save(ck, tmp_path / f"evil{i}.ckpt")
        for load in (original_vq.load_original_vq, O.load_original_ldm, original_common.load_lightning_checkpoint):
            with pytest.raises(UnsafeFileError) as err:
                load(path)
            assert str(path) in str(err.value) and name in str(err.value) and "refused" in str(err.value)
    # a plain protocol-4 pickle (STACK_GLOBAL) is refused the same way
    raw = tmp_path / "raw.ckpt"
    raw.write_bytes(pickle.dumps({"state_dict": {}, "x": payload(marker)}, protocol=4))
    with pytest.raises(UnsafeFileError, match=name):
        original_common.load_lightning_checkpoint(raw)
    assert not marker.exists()


class _TorchCall:
    def __reduce__(self):
        return (torch.set_default_dtype, (torch.float64,))


def test_torch_functions_outside_the_weights_only_list_are_refused_by_torch(tmp_path):
    """A torch.* global passes kpnb's own scan; torch's weights-only unpickler refuses it."""
    path = save(lightning(taming_vq_state(loss=False), extra=_TorchCall()), tmp_path / "t.ckpt")
    with pytest.raises(UnsafeFileError, match=r"t\.ckpt: refused by torch.load\(weights_only=True\).*set_default"):
        original_vq.load_original_vq(path)
    assert torch.get_default_dtype() == torch.float32


def test_garbage_file_is_refused(tmp_path):
    p = tmp_path / "junk.ckpt"
    p.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UnsafeFileError, match="junk.ckpt"):
        original_vq.load_original_vq(p)


# ---- kpnb's exporter: a grid model in the released checkpoint's layout -------------------------------
def test_exported_grid_model_reads_back_as_the_same_model(tmp_path):
    path, ldm, vq = exported_checkpoint(tmp_path / "exported.ckpt")
    back, back_vq = O.load_original_ldm(path, heads=UCFG["heads"], image_size=16, verbose=False)
    assert back.unet.cfg == ldm.unet.cfg and back.scale_factor == pytest.approx(0.7)
    assert set(back.import_report.missing) == {"cond.null_grid"}
    for k, v in ldm.unet.state_dict().items():
        torch.testing.assert_close(back.unet.state_dict()[k], v, rtol=0, atol=0)
    img = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back_vq.encode(img), vq.encode(img))
    poses = torch.rand(2, 17, 3)
    poses[..., 2] = 2
    torch.testing.assert_close(sampling.ddim_sample(back, poses, steps=3, seed=1), sampling.ddim_sample(ldm, poses, steps=3, seed=1))


def test_exporter_refuses_what_the_original_could_not_be(tmp_path):
    from kpnb.poses.conditioning import PoseConditioner

    _, ldm, vq = exported_checkpoint(tmp_path / "a.ckpt")
    cfg = {**UCFG, "context_dim": None, "in_channels": 3 + PoseConditioner("skeleton", latent_size=8).concat_channels}
    skel = D.KeypointLDM(D.UNetConfig(**cfg), PoseConditioner("skeleton", latent_size=8), (3, 8, 8))
    with pytest.raises(ValueError, match="conditioning"):
        O.save_original_ldm(skel, vq, tmp_path / "b.ckpt")
    v = D.KeypointLDM(D.UNetConfig(**UCFG), PoseConditioner("grid", latent_size=8), (3, 8, 8), prediction="v")
    with pytest.raises(ValueError, match="prediction"):
        O.save_original_ldm(v, vq, tmp_path / "c.ckpt")
    assert not (tmp_path / "b.ckpt").exists() and not (tmp_path / "c.ckpt").exists()
