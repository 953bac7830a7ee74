"""The conditional transformer over VQ codes: pose tokens, shapes, a loss over image codes only, learning,
deterministic sampling (top-k = 1 is greedy), top-p, checkpoint loading, decoding and PCK through the
shared pose_fidelity. Resume equivalence is kpnb.train.loop's and tested in test_training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kpnb.core import settings
from kpnb.evaluate import pose as pose_eval
from kpnb.models import transformer as T
from kpnb.models import vq
from kpnb.models.pose_net import PoseNet
from kpnb.poses.conditioning import flip_poses
from kpnb.poses.pose import HIDDEN, MISSING, OUTSIDE, VISIBLE, Pose, grid_tokens
from kpnb.train import transformer as transformer_training

N_CODES, LATENT = 32, (2, 3)
ARCH = {"n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}


def poses(n, seed=0):
    rng = np.random.default_rng(seed)
    p = np.zeros((n, 17, 3), np.float32)
    p[..., :2] = rng.uniform(0.1, 0.9, (n, 17, 2))
    p[..., 2] = VISIBLE
    return p


def tiny(seed=0):
    torch.manual_seed(seed)
    return T.make_transformer(ARCH, n_codes=N_CODES, latent_size=LATENT).eval()


def test_pose_tokens_faithful_order_and_own_tokens_for_missing_and_outside():
    p = poses(2)
    p[0, 3] = (0.0, 0.0, MISSING)
    p[0, 9] = (1.3, 0.5, OUTSIDE)
    p[0, 10, 2] = HIDDEN
    tok = T.pose_tokens(p)
    assert tok.shape == (2, 17) and tok.dtype == torch.long
    assert tok[0, 3] == T.MISSING_TOKEN == 1024 and tok[0, 9] == T.OUTSIDE_TOKEN == 1025
    keep = [j for j in range(17) if j not in (3, 9)]
    want = grid_tokens(Pose.from_array(p[0]), faithful_axes=True)
    np.testing.assert_array_equal(tok[0, keep].numpy(), want[keep])  # hidden joints keep their cell
    # the original's transposed order: the row (y) is the fast index
    x, y = p[1, 0, :2] * 32
    assert tok[1, 0] == int(np.floor(y)) + 32 * int(np.floor(x))
    assert int(tok.max()) < T.POSE_VOCAB


def test_shapes_and_vocabularies():
    m = tiny()
    cfg = m.cfg
    assert cfg.n_positions == 6 and cfg.block_size == 17 + 6 - 1
    assert m.tok_emb.num_embeddings == N_CODES + T.POSE_VOCAB and m.head.out_features == N_CODES
    codes = torch.randint(0, N_CODES, (3, *LATENT))
    seq = m.sequence(T.pose_tokens(poses(3)), codes)
    assert seq.shape == (3, 23) and bool((seq[:, :17] >= N_CODES).all())  # pose tokens in their own range
    assert m(seq[:, :-1]).shape == (3, 22, N_CODES)
    assert m(seq[:, :-1], start=16).shape == (3, 6, N_CODES)
    assert m.loss(T.pose_tokens(poses(3)), codes).ndim == 0
    with pytest.raises(ValueError, match="block size"):
        m(seq)
    with pytest.raises(ValueError, match="multiple of n_head"):
        T.make_transformer({**ARCH, "n_embd": 33}, n_codes=N_CODES, latent_size=LATENT)


def test_loss_is_taken_on_image_code_positions_only():
    m = tiny()
    ptok, codes = T.pose_tokens(poses(4)), torch.randint(0, N_CODES, (4, *LATENT))
    seq = m.sequence(ptok, codes)
    with torch.no_grad():
        loss = m.loss(ptok, codes)
        full = m(seq[:, :-1])  # logits at every position
        manual = torch.nn.functional.cross_entropy(full[:, 16:].reshape(-1, N_CODES), codes.reshape(-1))
    torch.testing.assert_close(loss, manual)

    def perturbed(positions):  # the final residual stream changed at some positions only
        def hook(_mod, _inp, out):
            out = out.clone()
            out[:, positions] += 10 * torch.randn_like(out[:, positions])
            return out
        h = m.blocks[-1].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return m.loss(ptok, codes)
        finally:
            h.remove()

    torch.testing.assert_close(perturbed(slice(0, 16)), loss)  # prefix positions predict nothing that counts
    assert not torch.allclose(perturbed(slice(16, 17)), loss)  # the last pose token predicts c_0


def test_training_lowers_the_loss(tmp_path):
    # a fixed tiny problem: each pose's codes are a function of its first joint's cell
    p = poses(16, seed=1)
    tok = T.pose_tokens(p)
    codes = torch.stack([(tok[:, 0] * (k + 1)) % N_CODES for k in range(6)], 1).reshape(16, *LATENT)
    cfg = {**ARCH, "steps": 60, "batch_size": 16, "lr": 3e-3, "warmup": 0, "ckpt_every": 1000, "weight_decay": 0.01,
           "seed": 0}
    before = transformer_training.validation_loss(tiny(), codes, p)
    model, res = transformer_training.train_transformer(codes, p, cfg, tmp_path / "ckpt", n_codes=N_CODES, progress=False)
    after = transformer_training.validation_loss(model, codes, p)
    assert res.step == 60 and (tmp_path / "ckpt" / "metrics.csv").exists()
    assert before > 3.0 and after < 0.5 * before, (before, after)
    loaded = transformer_training.load_transformer(tmp_path / "ckpt")
    assert transformer_training.validation_loss(loaded, codes, p) == pytest.approx(after, rel=1e-5)
    with pytest.raises(ValueError, match="code indices"):
        transformer_training.train_transformer(codes + N_CODES, p, cfg, tmp_path / "bad", n_codes=N_CODES, progress=False)


def test_sampling_is_deterministic_and_top_k_1_is_greedy():
    m = tiny()
    p = poses(3)
    a = T.sample_codes(m, p, seed=7)
    assert a.shape == (3, *LATENT) and a.dtype == torch.long and int(a.max()) < N_CODES
    assert torch.equal(a, T.sample_codes(m, p, seed=7))
    assert not torch.equal(a, T.sample_codes(m, p, seed=8))
    # greedy by hand
    seq = T.pose_tokens(p) + N_CODES
    with torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    greedy = seq[:, 17:].reshape(3, *LATENT)
    assert torch.equal(T.sample_codes(m, p, top_k=1, seed=1), greedy)
    assert torch.equal(T.sample_codes(m, p, top_k=1, seed=2), greedy)
    assert torch.equal(T.sample_codes(m, p, temperature=0.0), greedy)
    steps = []
    T.sample_codes(m, p, seed=0, top_k=5, top_p=0.9, callback=lambda d: steps.append(d["codes"].shape[1]))
    assert steps == [1, 2, 3, 4, 5, 6]


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(T.filter_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(T.filter_logits(logits, top_p=0.7)) == [True, True, False, False]  # 0.5 < 0.7 <= 0.8
    assert keep(T.filter_logits(logits, top_p=0.5)) == [True, False, False, False]
    assert keep(T.filter_logits(logits, top_p=0.0)) == [True, False, False, False]  # the best one always stays
    assert keep(T.filter_logits(logits, top_p=1.0)) == [True] * 4
    shuffled = logits[:, [2, 0, 3, 1]]
    assert keep(T.filter_logits(shuffled, top_p=0.7)) == [False, True, False, True]


def _tiny_f16() -> vq.VQModel:
    """An untrained f16 autoencoder for 32 px images (2x2 codes), seeded."""
    cfg = vq.vq_config_for("f16", {"image_size": 32, "models": {"f16": dict(
        latent_channels=4, n_codes=N_CODES, base_width=8, channel_mult=[1, 2, 2, 2], res_blocks=1,
        dec_res_blocks=1, stem=2)}})
    torch.manual_seed(0)
    return vq.VQModel(cfg).eval()


def test_codes_from_a_read_only_memmap_in_batches(tmp_path):
    ae = _tiny_f16()
    imgs = np.random.default_rng(1).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", imgs)
    mm = np.load(tmp_path / "images.npy", mmap_mode="r")  # as data.load_subset gives a big subset
    c, p = transformer_training.code_dataset(ae, mm, poses(5), flip=True)
    c_in_memory, _ = transformer_training.code_dataset(ae, imgs, poses(5), flip=True)
    assert torch.equal(c, c_in_memory)
    assert torch.equal(transformer_training.encode_codes(ae, mm, batch_size=2), c[:5])  # batch size does not change a code


def test_codes_to_images_and_pose_fidelity():
    ae = _tiny_f16()
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    codes = transformer_training.encode_codes(ae, imgs)
    assert codes.shape == (3, 2, 2) and codes.dtype == torch.long
    c2, p2 = transformer_training.code_dataset(ae, imgs, poses(3), flip=True)
    assert c2.shape == (6, 2, 2) and p2.shape == (6, 17, 3) and torch.equal(c2[:3], codes)
    # the second half: the codes of the mirrored images, with the mirrored poses
    assert torch.equal(c2[3:], transformer_training.encode_codes(ae, np.ascontiguousarray(imgs[:, :, ::-1])))
    assert torch.equal(p2[3:], flip_poses(torch.as_tensor(poses(3), dtype=p2.dtype)))
    torch.manual_seed(0)
    m = T.make_transformer(ARCH, n_codes=N_CODES, latent_size=(2, 2)).eval()
    out = T.sample_images(m, ae, poses(3), batch_size=2, seed=0, top_k=10)
    assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
    # batch k uses seed + k: the second batch alone gives the same images
    np.testing.assert_array_equal(out[2:], T.sample_images(m, ae, poses(3)[2:], batch_size=2, seed=1, top_k=10))
    imgs2, metrics = pose_eval.transformer_pose_fidelity(m, ae, PoseNet(image_size=32, width=8), poses(3), seed=0, top_k=10,
                                     batch_size=2, ceiling={"pck@0.1": 0.5})
    np.testing.assert_array_equal(imgs2, out)
    assert 0 <= metrics["pck@0.1"] <= 1 and metrics["sample_images_per_s"] > 0
    assert metrics["pck@0.1.ratio"] == pytest.approx(metrics["pck@0.1"] / 0.5)


def test_presets_build():
    for name in ("smoke", "cpu"):
        sec = settings.PRESETS[name]["transformer"]
        m = T.make_transformer(sec, n_codes=1024, latent_size=(4, 4))
        assert m.cfg.n_layer == sec["n_layer"] and m.cfg.n_embd == sec["n_embd"]
    with torch.device("meta"):  # shapes only
        g = T.make_transformer(settings.PRESETS["gpu"]["transformer"], n_codes=16384, latent_size=(16, 16))
    assert (g.cfg.n_layer, g.cfg.n_head, g.cfg.n_embd, g.cfg.block_size) == (24, 16, 1024, 17 + 256 - 1)


def test_bench_transformer_reports_training_and_sampling_speed():
    from kpnb.run import bench

    r = bench.bench_transformer("smoke", steps=1, gpu_config=False, sample=2)
    m = r["model"]
    assert m["latent"] == [2, 2] and m["params_M"] > 0  # f16 codes of 32 px smoke images
    assert m["train.gflop_per_image"] > 0 and m["train.images_per_s"] > 0 and m["sample.images_per_s"] > 0
    assert "original" not in r
