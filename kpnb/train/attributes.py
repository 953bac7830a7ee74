"""Training the attribute classifier (hair and outfit colour), the independent judge of CLIP tuning."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kpnb.core.images import check_uint8_images, to_model
from kpnb.core.runtime import Runtime, current
from kpnb.models.attributes import CLASSES, IGNORE, AttributeNet, encode_labels, labels_of
from kpnb.train import checkpoints
from kpnb.train import loop as training


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mirror, shift by up to 1/8 of the side, and for half the images blur (down- and up-sample by 2 or 4,
    like a VQ decoder's softness) plus a little noise. No colour changes: colour is the label."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * 0.25  # in [-1, 1] grid units: 1/8 of the side
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, :, 2] = shift
    x = F.grid_sample(x, F.affine_grid(theta, list(x.shape), align_corners=False), padding_mode="border",
                      align_corners=False)
    soft = torch.rand(n, generator=g) < 0.5
    f = 2 if torch.rand(1, generator=g).item() < 0.5 else 4
    blurred = F.interpolate(F.avg_pool2d(x, f), size=(h, w), mode="bilinear", align_corners=False)
    blurred = blurred + 0.05 * torch.randn(blurred.shape, generator=g)
    return torch.where(soft.view(n, 1, 1, 1), blurred, x)


#: The settings of :func:`train_attribute_classifier`, with their defaults.
TRAIN_DEFAULTS = {"steps": 600, "batch_size": 64, "lr": 2e-3, "width": 32, "depth": 3, "seed": 0}


def train_attribute_classifier(images: np.ndarray, labels: Mapping[str, Sequence[str | None]],
                               classes: Mapping[str, Sequence[str]], ckpt_dir: str | Path,
                               settings: Mapping[str, Any] | None = None, *, progress: bool = True,
                               resume: bool = True, runtime: Runtime | None = None):
    """Train on uint8 renders ``[N, H, W, 3]`` with ``labels[attr][i]`` a class name of ``classes[attr]``
    (or None when image i has no such attribute), through :func:`kpnb.train.loop.train`, on ``runtime``'s
    device (default: the current runtime). ``settings``: any keys of :data:`TRAIN_DEFAULTS` (the others keep
    their defaults). Returns ``(model in eval mode, TrainResult)``."""
    unknown = sorted(set(settings or {}) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"train_attribute_classifier: unknown setting(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(TRAIN_DEFAULTS)}")
    s = {**TRAIN_DEFAULTS, **(settings or {})}
    steps, batch_size, lr, seed = s["steps"], s["batch_size"], s["lr"], s["seed"]
    width, depth = s["width"], s["depth"]
    rt = runtime or current()
    x_all = check_uint8_images(images, single=True)
    y_all = {}
    for name, cls in classes.items():
        if name not in labels or len(labels[name]) != len(x_all):
            raise ValueError(f"labels[{name!r}] must have one entry per image ({len(x_all)})")
        y_all[name] = encode_labels(labels[name], cls, name)
    torch.manual_seed(seed)
    model = AttributeNet(classes, width=width, depth=depth).to(rt.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4, fused=True)

    def batch_fn(step: int):
        idx = training.batch_indices(len(x_all), batch_size, step, seed=seed)
        x = _augment(to_model(x_all[idx.numpy()]), training.seeded_generator(seed, step))
        return x, {k: v[idx] for k, v in y_all.items()}

    def step_fn(step: int, batch):
        x, y = batch
        training.set_lr(opt, training.warmup_cosine(step, steps, lr, warmup=min(50, steps // 10)))
        with rt.autocast():
            logits = model(x)
        losses = {k: F.cross_entropy(logits[k].float(), y[k], ignore_index=IGNORE) if (y[k] != IGNORE).any()
                  else logits[k].sum() * 0.0 for k in logits}
        loss = sum(losses.values())
        rt.backward_step(loss, opt)
        return {"loss": loss, **{f"loss_{k}": v for k, v in losses.items()}}

    config = {"classes": model.classes, "width": width, "depth": depth, "batch_size": batch_size, "lr": lr,
              "n_images": len(x_all)}
    loop = training.LoopSettings(steps=steps, ckpt_dir=ckpt_dir, config=config, batch_size=batch_size, seed=seed,
                                 desc="attribute classifier", resume=resume, progress=progress)
    result = training.train({"attributes": model}, {"opt": opt}, step_fn, batch_fn, loop, runtime=rt)
    return model.eval(), result


def train_from_preset(section: Mapping[str, object], images: np.ndarray, attrs: Sequence[Mapping[str, str | None]],
                      ckpt_dir: str | Path, *, progress: bool = True, resume: bool = True):
    """:func:`train_attribute_classifier` on renders and their ``attrs`` records for :data:`CLASSES`, with the
    ``attr_steps``, ``attr_width``, ``attr_depth`` and ``seed`` of a preset's ``clip`` section."""
    settings = {"steps": section["attr_steps"], "width": section["attr_width"], "depth": section["attr_depth"],
                "seed": section["seed"]}
    return train_attribute_classifier(images, labels_of(attrs), CLASSES, ckpt_dir, settings, progress=progress,
                                      resume=resume)


def load_attribute_classifier(ckpt_dir: str | Path) -> AttributeNet:
    """The classifier trained into ``ckpt_dir`` (latest checkpoint), in eval mode."""
    cfg = checkpoints.read_checkpoint_info(ckpt_dir).get("config", {})  # width and depth sit beside the classes
    return checkpoints.load_trained(ckpt_dir, "classes",
                                 lambda classes: AttributeNet(classes, width=cfg["width"], depth=cfg["depth"]),
                                 module="attributes", what="attribute-classifier")
