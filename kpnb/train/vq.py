"""Training the VQ autoencoders: the patch discriminator, perceptual loss and the GAN step, through the one loop."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kpnb.core import files
from kpnb.core.images import check_uint8_images
from kpnb.core.runtime import Runtime, current
from kpnb.models.vq import VQConfig, VQConfigError, VQModel, to_model_range, vq_config_for
from kpnb.train import checkpoints
from kpnb.train import loop as training


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming NLayerDiscriminator): one real/fake logit per overlapping patch."""

    def __init__(self, width: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        ch = width
        for i in range(1, n_layers + 1):
            out = width * min(2 ** i, 8)
            stride = 2 if i < n_layers else 1
            layers += [nn.Conv2d(ch, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            ch = out
        layers.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # the pix2pix initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# ---- optional perceptual loss -------------------------------------------------------------------------
class VGGPerceptual(nn.Module):
    """Distance between unit-normalised VGG16 features (LPIPS with equal layer weights). Built only from a
    local torchvision ``vgg16`` state dict file (e.g. ``vgg16-397923af.pth``); nothing is downloaded."""

    LAYERS = (3, 8, 15, 22, 29)  # relu1_2 .. relu5_3

    def __init__(self, weights_path: str | Path):
        super().__init__()
        import torchvision


        vgg = torchvision.models.vgg16(weights=None)
        sd, _ = files.load_tensors(weights_path)
        feats = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
        vgg.features.load_state_dict(feats)
        self.features = vgg.features[: self.LAYERS[-1] + 1].eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = torch.cat([x, y]).add(1).div(2).sub(self.mean).div(self.std)
        loss = x.new_zeros(())
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                a, b = F.normalize(h, dim=1).chunk(2)
                loss = loss + (a - b).pow(2).sum(1).mean()
        return loss


def perceptual_loss_for(path: str | None) -> tuple[VGGPerceptual | None, str]:
    """(loss module or None, a sentence saying whether it is on and why)."""
    if not path:
        return None, "perceptual loss off: no weights path set (vq.perceptual_weights); L1 + GAN only"
    if not Path(path).exists():
        return None, (f"perceptual loss off: {path} does not exist (put a torchvision vgg16 state dict there, "
                      f"e.g. vgg16-397923af.pth; nothing is downloaded)")
    return VGGPerceptual(path), f"perceptual loss on: VGG16 features from {path}"


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """Taming's balance of the GAN term: |grad rec| / |grad gan| at the decoder's last layer, clamped."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, 1e4).detach()


TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 1000, "batch_size": 32, "lr": 2e-4, "disc_lr": None, "betas": [0.5, 0.9], "warmup": 50,
    "disc_start": 500, "disc_weight": 0.5, "disc_width": 32, "disc_layers": 2, "reseed_every": 100,
    "perceptual_weights": None, "perceptual_weight": 1.0, "ckpt_every": 500, "log_every": 10, "seed": 0,
}


def train_settings(preset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings of a preset's vq section, filled with TRAIN_DEFAULTS."""
    return {k: preset_cfg.get(k, v) for k, v in TRAIN_DEFAULTS.items()}


class VQTrainer:
    """The models, optimisers and one training step of a VQ autoencoder; :func:`train_vq` drives it through
    :func:`kpnb.train.loop.train`, and :mod:`kpnb.run.bench` times the same step."""

    def __init__(self, cfg: VQConfig, settings: Mapping[str, Any], steps: int, runtime: Runtime | None = None):
        s = self.settings = {**TRAIN_DEFAULTS, **settings}
        self.cfg, self.steps, self.rt = cfg, steps, runtime or current()
        torch.manual_seed(int(s["seed"]))  # the same initial weights for the same seed (resume overwrites them)
        self.model = VQModel(cfg)
        self.disc = PatchDiscriminator(s["disc_width"], s["disc_layers"])
        self.perceptual, self.perceptual_note = perceptual_loss_for(s["perceptual_weights"])
        for m in (self.model, self.disc, self.perceptual):
            if m is not None:
                m.to(self.rt.device)
        # runtime.compile naming "vq" compiles the step's networks; the modules themselves (saved, used later for
        # encoding) stay as they are
        compiled = "vq" in self.rt.compile
        self.encode, self.decode, self.judge = ((torch.compile(f) if compiled else f)
                                                for f in (self.model.encode, self.model.decode, self.disc))
        # fused: one kernel over all tensors instead of a Python loop of per-tensor kernels (torch's CPU default)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=s["lr"], betas=tuple(s["betas"]), fused=True)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=s["disc_lr"] or s["lr"], betas=tuple(s["betas"]),
                                      fused=True)

    def step(self, step: int, x: torch.Tensor) -> dict[str, torch.Tensor | float]:
        """One step on images x in [-1, 1]: autoencoder (+ GAN term from ``disc_start``), then discriminator.
        Under several ranks the gradients are all-reduced before each optimiser step, and the data-dependent
        re-initialisations (linear path, codebook from data, dead-code re-seeding) are taken from rank 0."""
        s, model, disc, rt = self.settings, self.model, self.disc, self.rt
        lr = training.warmup_cosine(step, self.steps, s["lr"], s["warmup"])
        training.set_lr(self.opt, lr)
        training.set_lr(self.opt_d, lr * (s["disc_lr"] or s["lr"]) / s["lr"])
        first = not bool(model.quantizer.initialized)
        if self.cfg.linear_path and not bool(model.linear_initialized):
            model.init_linear_path(x)  # before the codebook is initialised from the encoder's outputs
            rt.broadcast_module(model)
        with rt.autocast():
            h = self.encode(x)
        h = h.float()  # the codebook lookup in fp32 (distances of nearby codes)
        zq, _, qloss = model.quantize(h)
        if first:
            rt.broadcast_module(model.quantizer)
        with rt.autocast():
            xrec = self.decode(zq).float()
        rec = (x - xrec).abs().mean()
        out: dict[str, torch.Tensor | float] = {"rec": rec, "codebook": qloss}
        if self.perceptual is not None:
            p = self.perceptual(xrec, x)
            out["perceptual"] = p
            rec = rec + s["perceptual_weight"] * p
        loss = rec + qloss
        gan_on = step >= s["disc_start"]
        if gan_on:
            disc.requires_grad_(False)  # the generator's backward must not reach D's weights
            with rt.autocast():
                g_loss = -self.judge(xrec).float().mean()
            w = adaptive_weight(rec, g_loss, model.decoder.conv_out.weight) * s["disc_weight"]
            loss = loss + w * g_loss
            disc.requires_grad_(True)
            out.update(g_loss=g_loss, gan_weight=w)
        rt.backward_step(loss, self.opt, average=True)
        if gan_on:
            with rt.autocast():
                real, fake = self.judge(x).float(), self.judge(xrec.detach()).float()
            d_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())  # hinge
            rt.backward_step(d_loss, self.opt_d, average=True)
            out["d_loss"] = d_loss
        if s["reseed_every"] and (step + 1) % s["reseed_every"] == 0:
            out["reseeded"] = float(model.quantizer.reseed_dead(h.detach()))
            rt.broadcast_module(model.quantizer)
        out["loss"] = loss
        return out


def train_vq(spec: str, images: np.ndarray, preset_cfg: Mapping[str, Any], ckpt_dir: str | Path, *,
             progress: bool = True, resume: bool = True, runtime: Runtime | None = None,
             **overrides: Any) -> tuple[VQModel, dict[str, Any]]:
    """Train the ``spec`` autoencoder on uint8 images [N, H, W, 3] (random horizontal flips) through
    :func:`kpnb.train.loop.train`; checkpoints and metrics.csv go to ``ckpt_dir``; a finished or interrupted
    run in ``ckpt_dir`` is resumed. ``overrides`` replace training settings (e.g. ``steps=10``). Returns
    (model in eval mode, info: settings, perceptual note, images_per_s, seconds, steps, history)."""
    cfg = vq_config_for(spec, preset_cfg)
    s = {**train_settings(preset_cfg), **overrides}
    unknown = sorted(set(overrides) - set(TRAIN_DEFAULTS))
    if unknown:
        raise VQConfigError(f"train_vq: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(TRAIN_DEFAULTS)}")
    data = check_uint8_images(images)  # indexed batch by batch: a memory-mapped subset stays on disk
    if data.shape[1] != cfg.image_size or data.shape[2] != cfg.image_size:
        raise ValueError(f"images are {data.shape[1]}x{data.shape[2]}, the {spec} model expects "
                         f"{cfg.image_size}x{cfg.image_size} (vq.image_size)")
    steps, bs, seed = int(s["steps"]), int(s["batch_size"]), int(s["seed"])
    trainer = VQTrainer(cfg, s, steps, runtime)
    print(trainer.perceptual_note)

    def batch_fn(step: int) -> torch.Tensor:
        x = to_model_range(data[training.batch_indices(len(data), bs, step, seed).numpy()])
        flip = torch.rand(bs, generator=training.seeded_generator(seed, step, 1)) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(3), x)

    # what must match to resume: the model and the training recipe (not the step count or logging cadence)
    recipe = {k: v for k, v in s.items() if k not in ("steps", "ckpt_every", "log_every")}
    config = {"spec": spec, "model": cfg.to_dict(), "train": recipe,
              "steps": steps, "n_images": len(data)}
    loop = training.LoopSettings(steps=steps, ckpt_dir=ckpt_dir, config=config, batch_size=bs,
                                 ckpt_every=int(s["ckpt_every"]), log_every=int(s["log_every"]), seed=seed,
                                 desc=f"vq-{spec}", resume=resume, progress=progress)
    res = training.train({"model": trainer.model, "disc": trainer.disc}, {"opt": trainer.opt, "opt_d": trainer.opt_d},
                         trainer.step, batch_fn, loop, runtime=trainer.rt)
    model = trainer.model.eval()
    return model, {"spec": spec, "config": cfg.to_dict(), "settings": s, "perceptual": trainer.perceptual_note,
                   "images_per_s": res.images_per_s, "seconds": res.seconds, "steps": res.step,
                   "start_step": res.start_step, "history": res.history}


def load_vq(ckpt_dir: str | Path) -> VQModel:
    """The trained autoencoder of a checkpoint folder (latest checkpoint), in eval mode."""
    return checkpoints.load_trained(ckpt_dir, "model", lambda c: VQModel(VQConfig.from_dict(c)), what="VQ")
