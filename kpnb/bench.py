"""``kpnb bench``: training/sampling speed of the workbook's models on the machine at hand.

Each ``bench_<stage>(preset, ...)`` returns a flat-ish dict of measurements; ``main`` prints them as JSON.
Numbers: images/s of real training steps (the step function the notebooks use, on random images), GFLOP
per image of one step (forward + backward + optimiser, counted with ``torch.utils.flop_counter``), the
achieved GFLOP/s, and the torch thread count. Compare numbers only within one run of one machine.

    kpnb bench vq [--preset cpu] [--steps 5] [--gpu-steps 1] [--specs f4,f8] [--threads 2] [--no-gpu-config]
    kpnb bench ldm [--preset cpu] [--modes grid,skeleton] [--sample-steps 50] [--diffusers] ...
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Callable

import torch

from . import runs


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _sig(v: float, digits: int = 4) -> float:
    """Round to significant digits (a gpu-preset model on a CPU runs at 0.006 images/s)."""
    return float(f"{v:.{digits}g}")


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call of ``fn`` (matrix products and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

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


# ---- VQ -----------------------------------------------------------------------------------------------
def bench_vq_model(spec: str, vq_section: dict[str, Any], *, batch_size: int, steps: int,
                   device: torch.device) -> dict[str, Any]:
    """One VQ spec under one preset section: the autoencoder-only phase and the phase with the GAN."""
    from . import vq

    cfg = vq.vq_config_for(spec, vq_section)
    settings = {**vq.train_settings(vq_section), "reseed_every": 0}
    disc_start = int(settings["disc_start"])
    total = int(settings["steps"])
    tr = vq.VQTrainer(cfg, settings, total).to(device)
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
    return out


def bench_vq(preset: str = "cpu", *, steps: int = 5, gpu_steps: int = 1, specs: list[str] | None = None,
             gpu_config: bool = True, gpu_specs: list[str] | None = None) -> dict[str, Any]:
    """Training speed of each VQ spec at ``preset`` (its batch size), and a few steps of the ``gpu`` preset's
    models (batch 1, 256x256) on the same device. On a CPU one step of a gpu-preset model takes about a
    minute, so there only f4 is run unless ``gpu_specs`` says otherwise; ``gpu_steps=0`` counts FLOPs only."""
    device = _device()
    section = runs.preset_config(preset)["vq"]
    specs = specs or list(section["specs"])
    # the load average says whether other work shared the cores (with 2 threads on 2 busy cores, torch can be
    # 10x slower than with 1: OpenMP threads wait for each other)
    res: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads(), "preset": preset,
                           "load_avg_1min": round(os.getloadavg()[0], 2), "models": []}
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
    from . import diffusion

    model = model.to(device)
    C, h, w = model.latent_shape
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch_size, C, h, w, generator=gen).to(device)
    poses = torch.rand(batch_size, 17, 3, generator=gen)
    poses[..., 2] = 2.0
    poses = poses.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(i: int) -> None:
        loss = model.loss(z, poses, generator=torch.Generator().manual_seed(i))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    gflop = count_flops(lambda: step(0)) / batch_size / 1e9
    out: dict[str, Any] = {"modes": "+".join(model.cond.modes), "latent": [C, h, w], "batch_size": batch_size,
                           "params_M": round(sum(p.numel() for p in model.unet.parameters()) / 1e6, 3),
                           "train.gflop_per_image": _sig(gflop)}
    if steps > 0:
        sec = time_steps(step, steps, device)
        out["train.images_per_s"] = _sig(batch_size / sec)
        out["train.gflop_per_s"] = _sig(gflop * batch_size / sec)
    if sample_steps > 0:
        model.eval()
        n = min(batch_size, 16)
        for name, g in (("ddim", 1.0), ("ddim_guided", 3.0)):
            t0 = time.perf_counter()
            diffusion.ddim_sample(model, poses[:n].cpu(), steps=sample_steps, guidance=g, seed=0)
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
    return out


def bench_ldm(preset: str = "cpu", *, steps: int = 5, gpu_steps: int = 1, specs: list[str] | None = None,
              gpu_config: bool = True, modes: list[str] | None = None, sample_steps: int = 50,
              diffusers: bool = False) -> dict[str, Any]:
    """Each conditioning mode of ``preset`` on latents of its VQ spec (f4 unless ``specs`` names one), and the
    original latent-diffusion keypoint UNet (base 160, 64x64x3 latents; batch 1) for ``gpu_steps`` steps."""
    from . import diffusion, vq

    device = _device()
    cfg = runs.preset_config(preset)
    d = {**diffusion.TRAIN_DEFAULTS, **cfg["diffusion"]}
    spec = (specs or ["f4"])[0]
    vcfg = vq.vq_config_for(spec, cfg["vq"])
    shape = (vcfg.latent_channels, vcfg.image_size // vcfg.factor, vcfg.image_size // vcfg.factor)
    res: dict[str, Any] = {"device": str(device), "torch_threads": torch.get_num_threads(), "preset": preset,
                           "spec": spec, "load_avg_1min": round(os.getloadavg()[0], 2), "models": []}
    for mode in modes or d["modes"]:
        torch.manual_seed(0)
        model = diffusion.make_ldm(mode, shape, **{k: d[k] for k in diffusion.ARCH_KEYS})
        res["models"].append(bench_ldm_model(model, batch_size=int(d["batch_size"]), steps=steps,
                                             sample_steps=sample_steps, device=device, diffusers=diffusers))
    if gpu_config and preset != "gpu":
        res["original"] = bench_ldm_model(diffusion.original_ldm(), batch_size=1, steps=gpu_steps,
                                          sample_steps=0, device=device, diffusers=diffusers)
    return res


BENCHES: dict[str, Callable[..., dict[str, Any]]] = {"vq": bench_vq, "ldm": bench_ldm}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kpnb bench", description="measure training speed (JSON on stdout)")
    p.add_argument("what", nargs="?", default="vq", choices=sorted(BENCHES), help="which model family")
    p.add_argument("--preset", default="cpu", help=f"one of {', '.join(runs.PRESETS)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per model")
    p.add_argument("--gpu-steps", type=int, default=1, help="timed steps of the gpu-preset models (0: FLOPs only)")
    p.add_argument("--specs", help="comma-separated subset, e.g. f4,f8")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
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
    if args.threads:
        torch.set_num_threads(args.threads)
    specs = [s.strip() for s in args.specs.split(",")] if args.specs else None
    t0 = time.time()
    extra = {} if args.what != "ldm" else {
        "modes": [m.strip() for m in args.modes.split(",")] if args.modes else None,
        "sample_steps": args.sample_steps, "diffusers": args.diffusers}
    res = BENCHES[args.what](args.preset, steps=args.steps, gpu_steps=args.gpu_steps, specs=specs,
                             gpu_config=args.gpu_config, **extra)
    res["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
