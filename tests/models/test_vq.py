"""VQ autoencoders: shapes, the gpu layout, checkpoint round trip, dead codes, learning, metrics."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from kpnb.core import settings
from kpnb.evaluate import vq as vq_eval
from kpnb.models import vq
from kpnb.train import vq as vq_training

TINY = {
    "f4": dict(latent_channels=3, n_codes=32, base_width=8, channel_mult=[1, 2], res_blocks=1, dec_res_blocks=1,
               stem=2),
    "f8": dict(latent_channels=4, n_codes=32, base_width=8, channel_mult=[1, 2, 2], res_blocks=1,
               dec_res_blocks=1, stem=2),
    "f16": dict(latent_channels=4, n_codes=32, base_width=8, channel_mult=[1, 2, 2, 2], res_blocks=1,
                dec_res_blocks=1, stem=2),
}
TINY_SECTION = {"image_size": 32, "models": TINY, "batch_size": 4, "lr": 2e-3, "warmup": 0, "disc_start": 3,
                "disc_width": 8, "disc_layers": 2, "reseed_every": 2, "ckpt_every": 100, "log_every": 1}


def _images(n: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    """Blocky colour images: easy to learn, so a few steps visibly lower the loss."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    return small.repeat(size // 4, 1).repeat(size // 4, 2)


@pytest.mark.parametrize("spec", vq.SPECS)
def test_latent_shapes(spec):
    torch.manual_seed(0)  # straight-through zq vs looked-up codes differ by float rounding; keep it reproducible
    cfg = vq.vq_config_for(spec, TINY_SECTION)
    model = vq.VQModel(cfg).eval()
    f = int(spec[1:])
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    h = model.encode(x)
    assert h.shape == (2, cfg.latent_channels, 32 // f, 32 // f)
    zq, idx, loss = model.quantize(h)
    assert zq.shape == h.shape and idx.shape == (2, 32 // f, 32 // f) and loss.ndim == 0
    assert model.decode(zq).shape == x.shape
    assert torch.allclose(model.decode_indices(idx), model.decode(zq), atol=1e-5)


def test_gpu_preset_is_the_original_f4():
    cfg = vq.vq_config_for("f4", settings.PRESETS["gpu"]["vq"])
    assert (cfg.factor, cfg.image_size, cfg.latent_channels, cfg.n_codes, cfg.base_width, cfg.channel_mult,
            cfg.stem, cfg.res_blocks, cfg.mid_attention) == (4, 256, 3, 8192, 128, (1, 2, 4), 1, 2, True)
    model = vq.VQModel(cfg)
    attn = [n for n, m in model.named_modules() if isinstance(m, vq.Attention)]
    assert attn == ["encoder.mid.1", "decoder.mid.1"]  # attention only in the middle blocks
    for spec in vq.SPECS:  # every preset builds every spec
        for preset in settings.PRESETS:
            vq.vq_config_for(spec, settings.PRESETS[preset]["vq"])


def test_config_errors_name_the_field():
    with pytest.raises(vq.VQConfigError, match="factor"):
        vq.VQConfig(factor=8, channel_mult=(1, 2), stem=1)
    with pytest.raises(vq.VQConfigError, match="unknown field.*widthh"):
        vq.VQConfig.from_dict({"widthh": 3})
    with pytest.raises(vq.VQConfigError, match="f32"):
        vq.vq_config_for("f32", TINY_SECTION)


def test_training_reads_a_read_only_memmap_batch_by_batch(tmp_path):
    """A big subset comes as a read-only memory map (data.load_subset): training gives the same weights as
    from memory, with no torch warning about non-writable arrays."""
    torch.set_num_threads(1)
    images = _images()
    np.save(tmp_path / "images.npy", images)
    mm = np.load(tmp_path / "images.npy", mmap_mode="r")
    a, _ = vq_training.train_vq("f4", images, TINY_SECTION, tmp_path / "a", steps=3, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b, _ = vq_training.train_vq("f4", mm, TINY_SECTION, tmp_path / "b", steps=3, progress=False)
        rec_b = vq_eval.reconstruct(b, mm)[0]
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    np.testing.assert_array_equal(vq_eval.reconstruct(a, images)[0], rec_b)


def test_training_lowers_loss_and_checkpoint_round_trips(tmp_path):
    torch.set_num_threads(1)
    images = _images()
    model, info = vq_training.train_vq("f4", images, TINY_SECTION, tmp_path, steps=30, progress=False)
    hist = info["history"]
    assert len(hist) == 30 and info["steps"] == 30
    first, last = np.mean([r["rec"] for r in hist[:3]]), np.mean([r["rec"] for r in hist[-3:]])
    assert last < 0.85 * first, (first, last)
    assert "d_loss" in hist[-1] and "d_loss" not in hist[0]  # the discriminator switched on at disc_start
    assert "perceptual loss off" in info["perceptual"]

    loaded = vq_training.load_vq(tmp_path)
    x = vq.to_model_range(torch.from_numpy(images[:4]))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])
    assert loaded.cfg == model.cfg
    m = vq_eval.evaluate_vq(loaded, images)
    assert m == vq_eval.evaluate_vq(model, images)
    assert 0 < m["psnr"] < vq_eval.PSNR_CAP and 0 < m["mae"] < 1 and 1 <= m["codebook_perplexity"] <= 32
    # a finished run called again resumes at its end and trains no further
    again, info2 = vq_training.train_vq("f4", images, TINY_SECTION, tmp_path, steps=30, progress=False)
    assert info2["start_step"] == 30
    with torch.no_grad():
        assert torch.equal(again(x)[0], model(x)[0])


def test_codebook_initialised_from_data_and_dead_codes_reseeded():
    torch.manual_seed(0)
    cfg = vq.VQConfig(factor=4, image_size=16, latent_channels=3, n_codes=16, base_width=8, channel_mult=(1, 2),
                      stem=2, res_blocks=1, dec_res_blocks=1)
    q = vq.VectorQuantizer(cfg).train()
    h = torch.randn(2, 3, 4, 4) * 5 + 10  # far from the random initial codes
    q(h)
    assert bool(q.initialized)
    z = h.permute(0, 2, 3, 1).reshape(-1, 3)
    nearest = torch.cdist(q.codebook.detach(), z).min(1).values
    assert (nearest < 0.5).all()  # every code starts on (next to) an encoder output

    q.usage.fill_(1.0 / 16)
    dead = torch.tensor([1, 5, 9])
    q.usage[dead] = 0.0
    with torch.no_grad():
        q.codebook[dead] = -1000.0  # far away: never chosen
    before = q.codebook.detach().clone()
    h2 = torch.randn(2, 3, 4, 4) - 50
    assert q.reseed_dead(h2) == 3
    after = q.codebook.detach()
    alive = torch.ones(16, dtype=torch.bool)
    alive[dead] = False
    assert torch.equal(after[alive], before[alive])
    z2 = h2.permute(0, 2, 3, 1).reshape(-1, 3)
    assert (torch.cdist(after[dead], z2).min(1).values < 0.5).all()  # moved onto current outputs
    assert (q.usage[dead] > cfg.dead_threshold / 16).all()  # given a grace period
    assert q.reseed_dead(h2) == 0


def test_reconstruction_metrics_hand_made():
    a = np.full((3, 8, 8, 3), 100, np.uint8)
    same = vq_eval.reconstruction_metrics(a, a)
    assert same == {"psnr": vq_eval.PSNR_CAP, "mae": 0.0}
    b = a + 10
    m = vq_eval.reconstruction_metrics(a, b)
    assert math.isclose(m["mae"], 10 / 255)
    assert math.isclose(m["psnr"], 20 * math.log10(255 / 10))
    c = a.copy()
    c[0] += 10  # only one image differs: PSNR is averaged per image
    m = vq_eval.reconstruction_metrics(a, c)
    assert math.isclose(m["psnr"], (20 * math.log10(255 / 10) + 2 * vq_eval.PSNR_CAP) / 3)
    with pytest.raises(ValueError, match="shapes"):
        vq_eval.reconstruction_metrics(a, a[:2])


def test_code_usage_hand_made():
    u = vq_eval.code_usage(np.arange(8).repeat(3), 8)
    assert math.isclose(u["codebook_perplexity"], 8) and u["codebook_used_fraction"] == 1.0
    u = vq_eval.code_usage(np.zeros(10, int), 8)
    assert math.isclose(u["codebook_perplexity"], 1) and u["codebook_used_fraction"] == 1 / 8
    u = vq_eval.code_usage(np.array([0, 0, 1, 1]), 4)
    assert math.isclose(u["codebook_perplexity"], 2) and u["codebook_used_fraction"] == 0.5


def test_bad_images_are_refused_with_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        vq_training.train_vq("f4", np.zeros((4, 32, 32, 3), np.float32), TINY_SECTION, tmp_path, steps=1, progress=False)
    with pytest.raises(ValueError, match="expects 32x32"):
        vq_training.train_vq("f4", np.zeros((4, 16, 16, 3), np.uint8), TINY_SECTION, tmp_path, steps=1, progress=False)


def test_bench_vq_reports_speed_and_flops():
    from kpnb.run import bench

    section = settings.preset_config("smoke")["vq"]
    r = bench.bench_vq_model("f4", section, batch_size=2, steps=1, device=torch.device("cpu"))
    assert r["gan.gflop_per_image"] > r["ae.gflop_per_image"] > 0  # the GAN phase adds the discriminator
    assert r["ae.images_per_s"] > 0 and r["gan.images_per_s"] > 0 and r["run.estimated_seconds"] > 0


def test_product_quantiser_snaps_each_group_to_its_own_codebook():
    torch.manual_seed(0)
    cfg = vq.VQConfig(factor=4, image_size=16, latent_channels=6, n_codes=8, base_width=8, channel_mult=(1,),
                      stem=4, code_groups=3)
    q = vq.VQModel(cfg).quantizer.train()
    h = torch.randn(2, 6, 4, 4)
    zq, idx, _ = q(h)                          # the first call initialises the codebooks from h
    assert q.codebook.shape == (24, 2) and idx.shape == (2, 4, 4, 3)
    for g in range(3):                         # group g's indices are rows g*8 .. g*8+7, nearest by brute force
        assert idx[..., g].min() >= 8 * g and idx[..., g].max() < 8 * (g + 1)
        zg = h[:, 2 * g:2 * g + 2].permute(0, 2, 3, 1).reshape(-1, 2)
        book = q.codebook[8 * g:8 * (g + 1)]
        assert torch.equal(torch.cdist(zg, book).argmin(1) + 8 * g, idx[..., g].flatten())
    assert torch.allclose(zq, q.codebook[idx].reshape(2, 4, 4, 6).permute(0, 3, 1, 2), atol=1e-6)
    lo, hi = q.channel_range()
    assert lo.shape == (6,) and torch.equal(hi[2:4], q.codebook[8:16].amax(0))
    with pytest.raises(vq.VQConfigError, match="code_groups 4 must divide latent_channels 6"):
        vq.VQConfig(factor=4, image_size=16, latent_channels=6, channel_mult=(1,), stem=4, code_groups=4)


def test_linear_path_starts_at_the_patch_pca(tmp_path):
    images = _images(16, 16)
    x = vq.to_model_range(torch.from_numpy(images))
    cfg = vq.VQConfig(factor=4, image_size=16, latent_channels=12, n_codes=16, base_width=8, channel_mult=(1,),
                      stem=4, linear_path=True)
    model = vq.VQModel(cfg)
    model.init_linear_path(x)
    # blocky images: every 4x4 patch is one colour, so 3 principal components rebuild them exactly, and the
    # zero-initialised deep paths add nothing at the start
    with torch.no_grad():
        rec = model.decode(model.encode(x))
    assert (rec - x).abs().max() < 1e-4
    assert bool(model.linear_initialized)
    # the flag is part of the checkpoint, so a resumed run does not redo the PCA over its training
    sd = model.state_dict()
    assert "linear_initialized" in sd and "encoder.linear.weight" in sd
