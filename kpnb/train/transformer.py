"""Training the conditional transformer over f16 codes (teacher forcing), through the one loop."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from kpnb.core.images import to_model
from kpnb.core.runtime import Method, Runtime, current
from kpnb.models.transformer import ARCH_KEYS, CondTransformer, TransformerConfig, make_transformer, pose_tokens
from kpnb.poses.conditioning import check_poses, flip_poses
from kpnb.train import checkpoints
from kpnb.train import loop as training

# the keys of a preset's transformer section that training reads (kpnb.core.settings.BASE holds their values)
TRAIN_KEYS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "ckpt_every", "seed") + ARCH_KEYS


# ======================================================================================================
# Codes <-> images through the VQ model
# ======================================================================================================
@torch.no_grad()
def encode_codes(vq: nn.Module, images: Any, batch_size: int = 64, flip: bool = False) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> the VQ model's code indices, long [N, h, w]; ``flip``: of the mirrored
    images. Read ``batch_size`` images at a time, so a memory-mapped subset is never held whole."""
    if getattr(vq.cfg, "code_groups", 1) != 1:
        raise ValueError(f"the transformer needs one code per latent cell; this VQ model has code_groups "
                         f"{vq.cfg.code_groups} (product quantisation): train its spec with code_groups 1")
    vq.eval()
    dev = next(vq.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        x = to_model(images[i:i + batch_size]).to(dev)
        out.append(vq.quantize(vq.encode(x.flip(-1) if flip else x))[1].cpu())
    return torch.cat(out)


def code_dataset(vq: nn.Module, images: Any, poses: Any, flip: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes [N, h, w], poses [N, 17, 3]) for training; ``flip`` appends the mirrored images' codes with the
    mirrored poses (2N samples). Codes are not mirror-symmetric, so the augmentation that the other trainers
    apply per batch is done here once, on the images."""
    p = check_poses(poses)
    codes = encode_codes(vq, images)
    if not flip:
        return codes, p
    return torch.cat([codes, encode_codes(vq, images, flip=True)]), torch.cat([p, flip_poses(p)])


# ======================================================================================================
# Training and loading
# ======================================================================================================
def train_transformer(codes: Any, poses: Any, cfg: Mapping[str, Any], ckpt_dir: str | Path, *, n_codes: int,
                      progress: bool = True, runtime: Runtime | None = None,
                      on_log: Callable[[dict[str, float]], None] | None = None) -> tuple[CondTransformer, Any]:
    """Train a CondTransformer on code indices ``codes`` [N, h, w] (e.g. :func:`code_dataset`) and ``poses``
    [N, 17, 3], for a VQ codebook of ``n_codes``. ``cfg``: the preset's ``transformer`` section (the keys of
    :data:`TRAIN_KEYS`; sampling keys are ignored here). Teacher forcing; AdamW (weight decay on
    matrices only, betas 0.9/0.95 as minGPT) with warm-up + cosine learning rate; the batch of step s is
    :func:`kpnb.train.loop.batch_indices` of (seed, s). ``runtime``: device, precision and ranks (default CPU).
    A run interrupted in ``ckpt_dir`` is resumed. Returns (the model in eval mode, the
    :class:`kpnb.train.loop.TrainResult`)."""
    rt = runtime or current()
    c = {k: cfg[k] for k in TRAIN_KEYS}
    codes = torch.as_tensor(codes).long()
    ptok = pose_tokens(poses)
    if codes.dim() != 3 or len(codes) != len(ptok):
        raise ValueError(f"train_transformer: codes must be [N, h, w] with N = {len(ptok)} poses, "
                         f"got {list(codes.shape)}")
    if int(codes.min()) < 0 or int(codes.max()) >= n_codes:
        raise ValueError(f"train_transformer: code indices must lie in 0..{n_codes - 1}, "
                         f"got {int(codes.min())}..{int(codes.max())}")
    seed, bs, steps = int(c["seed"]), int(c["batch_size"]), int(c["steps"])
    torch.manual_seed(seed)  # the same initial weights for the same seed (a resume overwrites them)
    model = make_transformer(c, n_codes=n_codes, latent_size=tuple(codes.shape[1:])).to(rt.device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "emb" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=c["lr"], betas=(0.9, 0.95),
                            fused=True)

    loss_of = rt.ddp(Method(model, "loss"), "transformer")

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = training.batch_indices(len(codes), bs, step, seed=seed)
        return ptok[idx], codes[idx]

    def step_fn(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        training.set_lr(opt, training.warmup_cosine(step, steps, c["lr"], c["warmup"]))
        with rt.autocast():
            loss = loss_of(*batch)
        rt.backward_step(loss, opt, clip=1.0)
        return {"loss": loss}

    config = {"transformer": model.config(),
              "train": {k: c[k] for k in TRAIN_KEYS if k not in ARCH_KEYS + ("steps", "ckpt_every")},
              "steps": steps, "n_train": len(codes)}
    loop = training.LoopSettings(steps=steps, ckpt_dir=ckpt_dir, config=config, batch_size=bs,
                                 ckpt_every=int(c["ckpt_every"]), seed=seed, desc="transformer", progress=progress)
    result = training.train({"model": model}, {"opt": opt}, step_fn, batch_fn, loop, on_log=on_log, runtime=rt)
    return model.eval(), result


def load_transformer(ckpt_dir: str | Path, device: str | torch.device | None = "cpu") -> CondTransformer:
    """The model of a :func:`train_transformer` checkpoint folder (or file), in eval mode."""
    model = checkpoints.load_trained(ckpt_dir, "transformer", lambda c: CondTransformer(TransformerConfig.from_dict(c)),
                                  what="kpnb transformer")
    return model.to(device or "cpu").eval()


@torch.no_grad()
def validation_loss(model: CondTransformer, codes: Any, poses: Any, batch_size: int = 256) -> float:
    """Mean teacher-forced cross-entropy (nats per code) on held-out codes [N, h, w] and poses."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    codes, ptok = torch.as_tensor(codes).long(), pose_tokens(poses)
    total = 0.0
    for i in range(0, len(codes), batch_size):
        total += float(model.loss(ptok[i:i + batch_size].to(dev), codes[i:i + batch_size].to(dev))) * len(
            codes[i:i + batch_size])
    model.train(was_training)
    return total / max(len(codes), 1)
