"""kpnb.core.runtime: settings, bf16 autocast training steps of every model on the CPU, device-free checkpoints,
DataLoader workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kpnb.core import files, runtime, settings
from kpnb.diffusion import ldm
from kpnb.models import clip as kc
from kpnb.models import pose_net, vq
from kpnb.train import attributes, checkpoints, transformer
from kpnb.train import clip as clip_training
from kpnb.train import estimator as estimator_training
from kpnb.train import ldm as ldm_training
from kpnb.train import vq as vq_training

BF16 = runtime.Runtime(torch.device("cpu"), precision="bf16")
SMOKE = settings.preset_config("smoke")


def _poses(n, seed=0):
    rng = np.random.default_rng(seed)
    p = np.zeros((n, 17, 3), np.float32)
    p[..., :2] = rng.uniform(0.2, 0.8, (n, 17, 2))
    p[..., 2] = 2
    return p


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _finite_and_moved(before: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before if before[k].is_floating_point())
    assert all(v.dtype != torch.bfloat16 for v in after.values()), "weights must stay fp32 under autocast"


def test_settings_resolve_and_bad_values_are_refused():
    rt = runtime.Runtime.from_settings(SMOKE["runtime"])
    assert rt.device.type in ("cpu", "cuda", "mps") and rt.world_size == 1 and rt.is_main
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(runtime.RuntimeSettingError, match="precision"):
        runtime.resolve_precision("fp8", torch.device("cpu"))
    with pytest.raises(runtime.RuntimeSettingError, match="fp16"):
        runtime.resolve_precision("fp16", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(runtime.RuntimeSettingError, match="no CUDA"):
            runtime.resolve_device("cuda")
    with pytest.raises(runtime.RuntimeSettingError, match="workers"):
        runtime.Runtime.from_settings({**SMOKE["runtime"], "workers": -1})
    assert settings.PRESETS["gpu"]["runtime"]["precision"] == "auto"


def test_compile_names_the_models_it_compiles():
    """runtime.compile: a list of model names (True/False: all/none); an unknown name is refused before any work,
    and ddp() compiles only a model the list names."""
    assert runtime.compiled_models(["ldm", "vq"]) == {"ldm", "vq"}
    assert runtime.compiled_models(True) == set(runtime.COMPILABLE) and runtime.compiled_models(False) == set()
    with pytest.raises(runtime.RuntimeSettingError, match="'unet'.*ldm"):
        runtime.Runtime.from_settings({**SMOKE["runtime"], "compile": ["unet"]})
    rt = runtime.Runtime.from_settings({**SMOKE["runtime"], "compile": ["ldm"]})
    m = torch.nn.Linear(2, 2)
    assert rt.ddp(m, "estimator") is m and rt.ddp(m, "ldm") is not m and "ldm compiled" in rt.describe()
    with pytest.raises(ValueError, match="unknown model 'unet'"):
        rt.ddp(m, "unet")
    assert settings.preset_config("cpu", {"runtime.compile": True})["runtime"]["compile"] is True
    # the VQ compiles its step's networks, never the modules it saves (compiling is lazy: nothing is compiled here)
    cfg = vq.vq_config_for("f8", SMOKE["vq"])
    eager = vq_training.VQTrainer(cfg, vq_training.train_settings(SMOKE["vq"]), 2, runtime.CPU)
    assert eager.encode == eager.model.encode and eager.judge is eager.disc
    tr = vq_training.VQTrainer(cfg, vq_training.train_settings(SMOKE["vq"]), 2,
                               runtime.Runtime.from_settings({**SMOKE["runtime"], "compile": ["vq"]}))
    assert tr.encode != tr.model.encode and tr.judge is not tr.disc and isinstance(tr.model.encoder, vq.Encoder)


def test_bf16_autocast_step_vq(tmp_path):
    model, info = vq_training.train_vq("f8", _images(8), SMOKE["vq"], tmp_path / "vq", progress=False, runtime=BF16,
                              steps=4, disc_start=2)
    assert info["steps"] == 4 and np.isfinite(info["history"][-1]["loss"])
    assert {"g_loss", "d_loss"} <= set(info["history"][-1])  # the GAN phase ran under autocast too
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_autocast_step_ldm(tmp_path):
    z = torch.randn(16, 4, 4, 4)
    cfg = SMOKE["diffusion"]
    torch.manual_seed(int(cfg["seed"]))
    start = ldm.ldm_from_settings(cfg, "tokens+skeleton", (4, 4, 4), scale_factor=1.0).state_dict()
    start = {k: v.clone() for k, v in start.items()}
    data = ldm_training.LatentSet(z, _poses(16), scale_factor=1.0)
    ema, res = ldm_training.train_ldm(data, {**cfg, "steps": 3}, tmp_path / "ldm", "tokens+skeleton", progress=False,
                                      runtime=BF16)
    assert res.step == 3 and np.isfinite(res.history[-1]["loss"])
    model = ldm.ldm_from_settings(cfg, "tokens+skeleton", (4, 4, 4), scale_factor=1.0)
    checkpoints.load_checkpoint(tmp_path / "ldm", {"model": model})
    _finite_and_moved(start, model)


def test_bf16_autocast_step_estimator(tmp_path):
    cfg = {**SMOKE["estimator"], "steps": 3}
    model, res = estimator_training.train_estimator(_images(8), _poses(8), cfg, tmp_path / "est", progress=False,
                                                runtime=BF16)
    assert res.step == 3 and np.isfinite(res.history[-1]["loss"])
    assert pose_net.predict(model, _images(2)).shape == (2, 17, 3)


def test_bf16_autocast_step_transformer(tmp_path):
    cfg = {**SMOKE["transformer"], "steps": 3}
    codes = torch.randint(0, 64, (8, 2, 2))
    model, res = transformer.train_transformer(codes, _poses(8), cfg, tmp_path / "tr", n_codes=64, progress=False,
                                               runtime=BF16)
    assert res.step == 3 and np.isfinite(res.history[-1]["loss"])


def test_bf16_autocast_step_clip_and_attributes(tmp_path):
    tiny = kc.domain_clip_config(image_size=32, patch_size=8, width=32, layers=1, text_width=32, text_layers=1,
                                 context_length=8, embed_dim=32)
    model, res = clip_training.train_domain_clip(_images(8), ["a girl with red hair"] * 8,
                                                 {"steps": 3, "batch_size": 4, "warmup": 1}, tmp_path / "clip",
                                                 model_cfg=tiny, progress=False, runtime=BF16)
    assert res.step == 3 and np.isfinite(res.history[-1]["loss"])
    classes = {"hair": ["red", "blue"]}
    labels = {"hair": ["red", "blue"] * 4}
    net, res = attributes.train_attribute_classifier(_images(8), labels, classes, tmp_path / "attr",
                                                     {"steps": 3, "batch_size": 4, "width": 8, "depth": 2},
                                                     progress=False, runtime=BF16)
    assert res.step == 3 and np.isfinite(res.history[-1]["loss"])


def test_checkpoints_hold_cpu_fp32_tensors_and_load_onto_the_current_device(tmp_path):
    """Saved from any device (here the CPU, trained under bf16 autocast), a checkpoint is plain fp32 CPU
    tensors: load_trained puts the model on the current runtime's device, whichever that is."""
    cfg = {**SMOKE["estimator"], "steps": 2}
    estimator_training.train_estimator(_images(8), _poses(8), cfg, tmp_path / "est", progress=False, runtime=BF16)
    tensors, _ = files.load_tensors(checkpoints.latest_checkpoint(tmp_path / "est").with_suffix(".safetensors"))
    assert all(t.device.type == "cpu" for t in tensors.values())
    assert all(t.dtype != torch.bfloat16 for t in tensors.values())
    prev = runtime.current()
    try:
        runtime.use(runtime.Runtime(torch.device("cpu")))
        model = estimator_training.load_estimator(tmp_path / "est")
        assert next(model.parameters()).device == runtime.current().device
    finally:
        runtime.use(prev)


def test_dataloader_workers_give_the_same_batches_as_the_main_thread(tmp_path):
    """runtime.workers > 0 builds batches in worker processes; the training is the same."""
    z = torch.randn(16, 4, 4, 4)
    cfg = {**SMOKE["diffusion"], "steps": 4}
    out = {}
    for workers in (0, 2):
        rt = runtime.Runtime(torch.device("cpu"), workers=workers)
        _, res = ldm_training.train_ldm(ldm_training.LatentSet(z, _poses(16), scale_factor=1.0), cfg,
                                        tmp_path / f"w{workers}", "skeleton", progress=False, runtime=rt)
        out[workers] = [r["loss"] for r in res.history]
    assert out[0] == out[2]


def test_latent_cache_holds_both_flips_and_is_rebuilt_for_another_vq(tmp_path):
    torch.manual_seed(0)
    ae = vq.VQModel(vq.vq_config_for("f8", SMOKE["vq"])).eval()
    ims = _images(5)
    z = ldm.latent_cache(ae, ims, tmp_path / "f8-train.npy", identity={"vq": "a"}, progress=False)
    assert isinstance(z, np.memmap) and z.shape[:2] == (5, 2)
    with torch.no_grad():
        want = ae.encode(torch.as_tensor(ims).permute(0, 3, 1, 2).float().div(127.5).sub(1).flip(-1)).numpy()
    np.testing.assert_allclose(z[:, 1], want, rtol=1e-5, atol=1e-5)  # [:, 1]: the mirror image's own latents
    mtime = (tmp_path / "f8-train.npy").stat().st_mtime_ns
    ldm.latent_cache(ae, ims, tmp_path / "f8-train.npy", identity={"vq": "a"}, progress=False)
    assert (tmp_path / "f8-train.npy").stat().st_mtime_ns == mtime  # reused
    ldm.latent_cache(ae, ims, tmp_path / "f8-train.npy", identity={"vq": "b"}, progress=False)
    assert (tmp_path / "f8-train.npy").stat().st_mtime_ns != mtime  # another VQ: rebuilt


def test_thread_policy_leaves_the_cores_other_processes_use(monkeypatch):
    """runtime.threads "auto": another process busy on one core -> one thread fewer; idle -> all cores."""
    clock = {"busy": 0.0, "own": 0.0, "t": 0.0}
    monkeypatch.setattr(runtime, "_busy_seconds", lambda: clock["busy"])
    monkeypatch.setattr(runtime, "_own_seconds", lambda: clock["own"])
    monkeypatch.setattr(runtime.time, "monotonic", lambda: clock["t"])
    before = torch.get_num_threads()
    try:
        policy = runtime.ThreadPolicy(max_threads=4, every=30)
        clock.update(t=10.0, busy=10.0 * 3.0, own=10.0 * 2.0)  # we used 2 cores, someone else 1
        assert policy.fit() == 3 and torch.get_num_threads() == 3
        clock.update(t=20.0)  # 10 s later: not time to look again yet
        assert policy.maybe_fit() is None
        clock.update(t=45.0, busy=30.0 + 35.0 * 3.0, own=20.0 + 35.0 * 3.0)  # the other process has stopped
        assert policy.maybe_fit() == 4 and torch.get_num_threads() == 4
        # a process pool kept both other cores busy, then training started: restart() leaves the pool out
        clock.update(t=100.0, busy=150.0 + 55.0 * 4.0, own=125.0 + 55.0 * 2.0)
        policy.restart()
        clock.update(t=131.0, busy=370.0 + 31.0 * 4.0, own=235.0 + 31.0 * 4.0)
        assert policy.maybe_fit() is None and torch.get_num_threads() == 4
    finally:
        torch.set_num_threads(before)
