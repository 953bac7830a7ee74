"""``kpnb bench``: training/sampling speed of the workbook's models on the machine at hand.

Each ``bench_<stage>(preset, ...)`` returns a flat-ish dict of measurements; ``main`` prints them as JSON.
Numbers: images/s of real training steps (the step function the notebooks use, on random images), GFLOP
per image of one step (forward + backward + optimiser, counted with ``torch.utils.flop_counter``), the
achieved GFLOP/s, and the torch thread count. Compare numbers only within one run of one machine.

    kpnb bench vq [--preset cpu] [--steps 5] [--gpu-steps 1] [--specs f4,f8] [--threads 2] [--no-gpu-config]
    kpnb bench ldm [--preset cpu] [--modes grid,skeleton] [--sample-steps 50] [--diffusers] ...
    kpnb bench transformer | clip | all [--preset cpu] [--steps 5] [--gpu-steps 1] ...
    kpnb bench ldm --preset gpu --device cuda --precision bf16 --no-gpu-config   # the gpu preset on a GPU

``--device`` (auto: cuda, else mps, else cpu) and ``--precision`` (fp32, bf16, fp16, auto) set the
:class:`kpnb.core.runtime.Runtime` every model runs under (autocast, gradient scaler for fp16); on CUDA each model
also reports its peak memory (``peak_gib``).

Each also times the original study's configuration (the ``gpu`` preset's models: taming's f4 VQGAN, the
latent-diffusion keypoint UNet, taming's 24-layer transformer, tuning with a ViT-B-32-sized CLIP) for
``--gpu-steps`` steps at batch 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from kpnb.core import settings as runs
from kpnb.core.runtime import COMPILABLE, Method, Runtime
from kpnb.diffusion import ldm, sampling
from kpnb.models import clip as kclip
from kpnb.models import transformer, vq
from kpnb.train import vq as vq_training
from kpnb.tuning import clip_tuning

RT = Runtime(torch.device("cpu"))  # what the benches run under; main() sets it from --device/--precision


def _device() -> torch.device:
    return RT.device


def _peak(out: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Add the peak GPU memory since the last reset (CUDA only) and reset it for the next model."""
    if device.type == "cuda":
        out["peak_gib"] = _sig(torch.cuda.max_memory_allocated(device) / 2 ** 30, 3)
        torch.cuda.reset_peak_memory_stats(device)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _sig(v: float, digits: int = 4) -> float:
    """Round to significant digits (a gpu-preset model on a CPU runs at 0.006 images/s)."""
    return float(f"{v:.{digits}g}")


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` (matrix products and convolutions, forward and backward)."""

    with FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def time_steps(fn: Callable[[int], Any], steps: int, device: torch.device, warmup: int = 1) -> float:
    """Seconds per call of ``fn(i)``, after ``warmup`` untimed calls."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        fn(warmup + i)
    _sync(device)
    return (time.perf_counter() - t0) / max(1, steps)


def _header(device: torch.device, preset: str, **extra: Any) -> dict[str, Any]:
    """What every bench result starts with. The load average says whether other work shared the cores (with
    2 threads on 2 busy cores, torch can be 10x slower than with 1: OpenMP threads wait for each other)."""
    return {"device": str(device), "precision": RT.precision, "compile": sorted(RT.compile),
            "torch_threads": torch.get_num_threads(),
            "preset": preset, **extra,
            "load_avg_1min": round(os.getloadavg()[0], 2)}


def train_speed(step: Callable[[int], Any], batch_size: int, steps: int, device: torch.device) -> dict[str, float]:
    """GFLOP per image of one training ``step(i)`` (counted; it doubles as the warm-up), and with ``steps``
    > 0 its images/s and achieved GFLOP/s over ``steps`` timed calls."""
    gflop = count_flops(lambda: step(0)) / batch_size / 1e9
    out = {"train.gflop_per_image": _sig(gflop)}
    if steps > 0:
        sec = time_steps(step, steps, device)
        out["train.images_per_s"] = _sig(batch_size / sec)
        out["train.gflop_per_s"] = _sig(gflop * batch_size / sec)
    return out


# ---- VQ -----------------------------------------------------------------------------------------------
def bench_vq_model(spec: str, vq_section: dict[str, Any], *, batch_size: int, steps: int,
                   device: torch.device) -> dict[str, Any]:
    """One VQ spec under one preset section: the autoencoder-only phase and the phase with the GAN."""

    cfg = vq.vq_config_for(spec, vq_section)
    settings = {**vq_training.train_settings(vq_section), "reseed_every": 0}
    disc_start = int(settings["disc_start"])
    total = int(settings["steps"])
    tr = vq_training.VQTrainer(cfg, settings, total, RT)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(batch_size, 3, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1).to(device)
    out: dict[str, Any] = {"spec": spec, "image_size": cfg.image_size, "batch_size": batch_size,
                           "params_M": round(sum(p.numel() for p in tr.model.parameters()) / 1e6, 3)}
    for phase, first_step in (("ae", 0), ("gan", max(disc_start, 0))):
        # the counted step doubles as the warm-up (codebook initialisation, allocator, kernel choice)
        gflop = count_flops(lambda: tr.step(first_step, x)) / batch_size / 1e9
        out[f"{phase}.gflop_per_image"] = _sig(gflop)
        if steps <= 0:
            continue
        sec = time_steps(lambda i: tr.step(first_step, x), steps, device, warmup=0)
        out[f"{phase}.images_per_s"] = _sig(batch_size / sec)
        out[f"{phase}.gflop_per_s"] = _sig(gflop * batch_size / sec)
    if steps <= 0:
        return out
    # the mean over a whole run: the GAN phase covers the steps from disc_start on
    frac_gan = min(1.0, max(0.0, (total - disc_start) / max(1, total)))
    sec_per_img = (1 - frac_gan) / out["ae.images_per_s"] + frac_gan / out["gan.images_per_s"]
    out["run.images_per_s"] = _sig(1 / sec_per_img)
    out["run.estimated_seconds"] = _sig(total * batch_size * sec_per_img)
    return _peak(out, device)


def bench_vq(preset: str = "cpu", *, steps: int = 5, gpu_steps: int = 1, specs: list[str] | None = None,
             gpu_config: bool = True, gpu_specs: list[str] | None = None) -> dict[str, Any]:
    """Training speed of each VQ spec at ``preset`` (its batch size), and a few steps of the ``gpu`` preset's
    models (batch 1, 256x256) on the same device. On a CPU one step of a gpu-preset model takes about a
    minute, so there only f4 is run unless ``gpu_specs`` says otherwise; ``gpu_steps=0`` counts FLOPs only."""
    device = _device()
    section = runs.preset_config(preset)["vq"]
    specs = specs or list(section["specs"])
    res = {**_header(device, preset), "models": []}
    for spec in specs:
        res["models"].append(bench_vq_model(spec, section, batch_size=int(section["batch_size"]), steps=steps,
                                            device=device))
    if gpu_config and preset != "gpu":
        gpu_section = runs.preset_config("gpu")["vq"]
        gpu_specs = gpu_specs or (specs if device.type == "cuda" else ["f4"])
        res["gpu_config"] = [bench_vq_model(spec, gpu_section, batch_size=1, steps=gpu_steps, device=device)
                             for spec in gpu_specs]
    return res


# ---- latent diffusion ---------------------------------------------------------------------------------
def _diffusers_twin(unet: torch.nn.Module) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel at the configuration of a kpnb UNet (same widths, levels, res blocks,
    attention levels, heads, context width) - for the throughput comparison only."""
    from diffusers import UNet2DConditionModel

    cfg = unet.cfg
    ds = [2 ** i for i in range(len(cfg.mults))]
    down = tuple("CrossAttnDownBlock2D" if d in cfg.attn_ds else "DownBlock2D" for d in ds)
    up = tuple("CrossAttnUpBlock2D" if d in cfg.attn_ds else "UpBlock2D" for d in ds)[::-1]
    return UNet2DConditionModel(in_channels=cfg.in_channels, out_channels=cfg.out_channels, down_block_types=down,
                                up_block_types=up, block_out_channels=tuple(cfg.base * m for m in cfg.mults),
                                layers_per_block=cfg.num_res_blocks, attention_head_dim=cfg.heads,
                                cross_attention_dim=cfg.context_dim or cfg.base, norm_num_groups=cfg.groups)


def bench_ldm_model(model: Any, *, batch_size: int, steps: int, sample_steps: int, device: torch.device,
                    diffusers: bool = False) -> dict[str, Any]:
    """Training step (loss, backward, fused AdamW) and DDIM sampling speed of one KeypointLDM."""

    model = model.to(device)
    C, h, w = model.latent_shape
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch_size, C, h, w, generator=gen).to(device)
    poses = torch.rand(batch_size, 17, 3, generator=gen)
    poses[..., 2] = 2.0
    poses = poses.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    loss_of = RT.ddp(Method(model, "loss"), "ldm")  # compiled as training compiles it (--compile ldm)

    def step(i: int) -> None:
        with RT.autocast():
            loss = loss_of(z, poses, generator=torch.Generator().manual_seed(i))
        RT.backward_step(loss, opt)

    out: dict[str, Any] = {"modes": "+".join(model.cond.modes), "latent": [C, h, w], "batch_size": batch_size,
                           "params_M": round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 3),
                           **train_speed(step, batch_size, steps, device)}
    if sample_steps > 0:
        model.eval()
        n = min(batch_size, 16)
        for name, g in (("ddim", 1.0), ("ddim_guided", 3.0)):
            t0 = time.perf_counter()
            with torch.no_grad(), RT.autocast():
                sampling.ddim_sample(model, poses[:n].cpu(), steps=sample_steps, guidance=g, seed=0)
            _sync(device)
            out[f"{name}{sample_steps}.images_per_s"] = _sig(n / (time.perf_counter() - t0))
        model.train()
    if diffusers and steps > 0:
        try:
            twin = _diffusers_twin(model.unet).to(device)
        except ImportError:
            out["diffusers"] = "not installed (pip install diffusers to compare)"
            return out
        cond = model.cond(poses)
        x = z if cond.concat is None else torch.cat([z, cond.concat], 1)
        ctx = cond.context if cond.context is not None else torch.zeros(batch_size, 1, twin.config.cross_attention_dim,
                                                                        device=device)
        x, ctx = x.detach(), ctx.detach()  # inputs only: the twin trains its own weights
        t = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
        dopt = torch.optim.AdamW(twin.parameters(), lr=1e-5, fused=True)

        def dstep(i: int) -> None:
            loss = twin(x, t, ctx).sample.square().mean()
            dopt.zero_grad(set_to_none=True)
            loss.backward()
            dopt.step()

        dg = count_flops(lambda: dstep(0)) / batch_size / 1e9
        dsec = time_steps(dstep, steps, device)
        out["diffusers.params_M"] = round(sum(p.numel() for p in twin.parameters()) / 1e6, 3)
        out["diffusers.train.gflop_per_image"] = _sig(dg)
        out["diffusers.train.images_per_s"] = _sig(batch_size / dsec)
    return _peak(out, device)


def bench_ldm(preset: str = "cpu", *, steps: int = 5, gpu_steps: int = 1, specs: list[str] | None = None,
              gpu_config: bool = True, modes: list[str] | None = None, sample_steps: int = 50,
              diffusers: bool = False) -> dict[str, Any]:
    """Each conditioning mode of ``preset`` on latents of its VQ spec (f4 unless ``specs`` names one), and the
    original latent-diffusion keypoint UNet (base 160, 64x64x3 latents; batch 1) for ``gpu_steps`` steps."""

    device = _device()
    cfg = runs.preset_config(preset)
    d = cfg["diffusion"]
    spec = (specs or ["f4"])[0]
    vcfg = vq.vq_config_for(spec, cfg["vq"])
    shape = (vcfg.latent_channels, vcfg.image_size // vcfg.factor, vcfg.image_size // vcfg.factor)
    res = {**_header(device, preset, spec=spec), "models": []}
    for mode in modes or d["modes"]:
        torch.manual_seed(0)
        model = ldm.ldm_from_settings(d, mode, shape)
        res["models"].append(bench_ldm_model(model, batch_size=int(d["batch_size"]), steps=steps,
                                             sample_steps=sample_steps, device=device, diffusers=diffusers))
    if gpu_config and preset != "gpu":
        res["original"] = bench_ldm_model(ldm.original_ldm(), batch_size=1, steps=gpu_steps,
                                          sample_steps=0, device=device, diffusers=diffusers)
    return res


# ---- conditional transformer -------------------------------------------------------------------------
def bench_transformer_model(tcfg: dict[str, Any], vq_cfg: Any, *, batch_size: int, steps: int, sample: int,
                            device: torch.device) -> dict[str, Any]:
    """Training step (teacher forcing, AdamW, clipping as :func:`kpnb.train.transformer.train_transformer`) and,
    with ``sample`` > 0, sampling ``sample`` images (codes one at a time, then the VQ decoder)."""

    side = vq_cfg.image_size // vq_cfg.factor
    torch.manual_seed(0)
    model = transformer.make_transformer(tcfg, n_codes=vq_cfg.n_codes, latent_size=(side, side)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)
    gen = torch.Generator().manual_seed(0)
    poses = torch.rand(batch_size, 17, 3, generator=gen)
    poses[..., 2] = 2.0
    ptok = transformer.pose_tokens(poses).to(device)
    codes = torch.randint(0, vq_cfg.n_codes, (batch_size, side, side), generator=gen).to(device)

    def step(i: int) -> None:
        with RT.autocast():
            loss = model.loss(ptok, codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    out: dict[str, Any] = {"latent": [side, side], "n_codes": vq_cfg.n_codes, "batch_size": batch_size,
                           "params_M": round(model.n_params() / 1e6, 3), **train_speed(step, batch_size, steps, device)}
    if sample > 0:
        ae = vq.VQModel(vq_cfg).to(device).eval()
        model.eval()
        t0 = time.perf_counter()
        transformer.sample_images(model, ae, poses[:sample].numpy(), seed=0, top_k=100)
        _sync(device)
        out["sample.images_per_s"] = _sig(sample / (time.perf_counter() - t0))
    return _peak(out, device)


def bench_transformer(preset: str = "cpu", *, steps: int = 5, gpu_steps: int = 1, specs: list[str] | None = None,
                      gpu_config: bool = True, sample: int = 16) -> dict[str, Any]:
    """The preset's transformer over the codes of its VQ spec, and taming's configuration (the ``gpu``
    preset: 24 layers of width 1024 over 16x16 f16 codes; batch 1, training step only: sampling it one code
    at a time without a cache takes minutes per image on a CPU)."""

    device = _device()
    cfg = runs.preset_config(preset)
    t = cfg["transformer"]
    spec = (specs or [t["spec"]])[0]
    res = _header(device, preset, spec=spec)
    res["model"] = bench_transformer_model(t, vq.vq_config_for(spec, cfg["vq"]), batch_size=int(t["batch_size"]),
                                           steps=steps, sample=sample, device=device)
    if gpu_config and preset != "gpu":
        g = runs.preset_config("gpu")
        res["original"] = bench_transformer_model(g["transformer"], vq.vq_config_for(g["transformer"]["spec"], g["vq"]),
                                                  batch_size=1, steps=gpu_steps, sample=0, device=device)
    return res


# ---- CLIP ---------------------------------------------------------------------------------------------
def bench_clip_tuning(clip_model: torch.nn.Module, vq_cfg: Any, *, n_images: int, cutouts: int, steps: int,
                      device: torch.device) -> dict[str, Any]:
    """Iterations/s of :func:`kpnb.tuning.clip_tuning.tune` (``n_images`` latents, ``cutouts`` crops each) with a
    randomly initialised VQ decoder of ``vq_cfg`` (the speed does not depend on the weights)."""

    torch.manual_seed(0)
    ae = vq.VQModel(vq_cfg).to(device).eval()
    images = torch.randint(0, 256, (n_images, vq_cfg.image_size, vq_cfg.image_size, 3), dtype=torch.uint8).numpy()
    clip_tuning.tune(ae, clip_model, images, "a girl with red hair", steps=1, cutouts=cutouts, progress=False)  # warm-up
    r = clip_tuning.tune(ae, clip_model, images, "a girl with red hair", steps=steps, cutouts=cutouts, progress=False,
                         record_every=10 ** 9)
    return {"spec": f"f{vq_cfg.factor}", "n_images": n_images, "cutouts": cutouts,
            "tune.iterations_per_s": _sig(r.iterations_per_s)}


def bench_clip(preset: str = "cpu", *, steps: int = 5, gpu_steps: int = 1, specs: list[str] | None = None,
               gpu_config: bool = True) -> dict[str, Any]:
    """The preset's domain CLIP (contrastive training images/s) and CLIP tuning iterations/s on its
    first VQ spec's latents (``n_tune`` images x ``cutouts``, or each of ``specs``); with ``gpu_config``
    also tuning one 256x256 image on the gpu preset's VQ with an untrained open_clip ViT-B-32 (the size of
    the pretrained CLIP a person points at; nothing is downloaded)."""

    import open_clip


    device = _device()
    cfg = runs.preset_config(preset)
    c = cfg["clip"]
    res = _header(device, preset)
    with tempfile.TemporaryDirectory() as tmp:
        model = kclip.create_domain_clip(kclip.model_config_from_preset(c), tmp).to(device)
    bs, size = int(c["batch_size"]), int(c["image_size"])
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(bs, 3, size, size, generator=gen).to(device)
    tokens = kclip.tokenizer_for(model)(["a girl with red hair"] * bs).to(device)
    loss_fn = open_clip.ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step(i: int) -> None:
        with RT.autocast():
            img = model.encode_image(kclip.clip_input(model, x), normalize=True)
            txt = model.encode_text(tokens, normalize=True)
        loss = loss_fn(img.float(), txt.float(), model.logit_scale.exp())
        RT.backward_step(loss, opt)

    out: dict[str, Any] = {"params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
                           **train_speed(step, bs, steps, device)}
    if steps > 0:
        model.eval()
        out["tuning"] = [bench_clip_tuning(model, vq.vq_config_for(s, cfg["vq"]), n_images=int(c["n_tune"]),
                                           cutouts=int(c["cutouts"]), steps=steps, device=device)
                         for s in (specs or [cfg["vq"]["specs"][0]])]
    res["domain_clip"] = out
    if gpu_config and preset != "gpu" and gpu_steps > 0:
        g = runs.preset_config("gpu")
        with kclip._quiet_open_clip():
            big = open_clip.create_model(c["pretrained_arch"], pretrained=None).to(device).eval()
        # the original tuned f16 latents
        res["original"] = {"clip": c["pretrained_arch"], **bench_clip_tuning(
            big, vq.vq_config_for("f16", g["vq"]), n_images=1, cutouts=int(g["clip"]["cutouts"]),
            steps=gpu_steps, device=device)}
    return res


BENCHES: dict[str, Callable[..., dict[str, Any]]] = {"vq": bench_vq, "ldm": bench_ldm,
                                                     "transformer": bench_transformer, "clip": bench_clip}


def bench_all(preset: str = "cpu", **kw: Any) -> dict[str, Any]:
    """Every bench above, one after the other (``kpnb bench all``)."""
    return {name: fn(preset, **kw) for name, fn in BENCHES.items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["data"]:  # the data path (pack, filter) on synthetic pools: kpnb.run.bench_data
        from kpnb.run import bench_data

        return bench_data.main(argv[1:])
    p = argparse.ArgumentParser(prog="kpnb bench", description="measure training speed (JSON on stdout); "
                                "`kpnb bench data --help` for the data path")
    p.add_argument("what", nargs="?", default="vq", choices=sorted(BENCHES) + ["all"], help="which model family")
    p.add_argument("--preset", default="cpu", help=f"one of {', '.join(runs.PRESETS)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--gpu-steps", type=int, default=1, help="timed steps of the gpu-preset models (0: FLOPs only)")
    p.add_argument("--specs", help="comma-separated subset, e.g. f4,f8")
    p.add_argument("--threads", type=int, help="torch threads (default: the cores other processes leave free)")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--precision", default="fp32", help="fp32, bf16, fp16 (GPU) or auto")
    p.add_argument("--compile", default="", help="comma-separated models to torch.compile: any of "
                   f"{', '.join(COMPILABLE)} (runtime.compile; the first timed step waits for the compiler)")
    p.add_argument("--no-gpu-config", dest="gpu_config", action="store_false",
                   help="skip the gpu-preset models (slow on a CPU: minutes per step)")
    p.add_argument("--modes", help="ldm: comma-separated conditioning modes (default: the preset's)")
    p.add_argument("--sample-steps", type=int, default=50, help="ldm: DDIM steps timed (0: no sampling)")
    p.add_argument("--diffusers", action="store_true",
                   help="ldm: also time diffusers' UNet2DConditionModel at the same configuration (if installed)")
    args = p.parse_args(argv)
    if args.preset not in runs.PRESETS:
        print(f"kpnb bench: unknown preset {args.preset!r}; valid: {', '.join(runs.PRESETS)}", file=sys.stderr)
        return 2
    global RT
    try:  # threads: as given, else fitted to the cores other processes leave free (runtime.threads "auto")
        RT = Runtime.from_settings({"device": args.device, "precision": args.precision,
                                    "compile": [m.strip() for m in args.compile.split(",") if m.strip()],
                                    "workers": 0, "threads": args.threads or "auto"})
    except ValueError as e:
        print(f"kpnb bench: {e}", file=sys.stderr)
        return 2
    specs = [s.strip() for s in args.specs.split(",")] if args.specs else None
    t0 = time.time()
    extra = {} if args.what != "ldm" else {
        "modes": [m.strip() for m in args.modes.split(",")] if args.modes else None,
        "sample_steps": args.sample_steps, "diffusers": args.diffusers}
    res = (bench_all if args.what == "all" else BENCHES[args.what])(args.preset, steps=args.steps, gpu_steps=args.gpu_steps, specs=specs,
                             gpu_config=args.gpu_config, **extra)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
