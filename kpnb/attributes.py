"""An attribute classifier (hair colour, outfit colour) that is NOT CLIP: the judge of CLIP tuning.

CLIP tuning optimises a CLIP score, so the CLIP score after tuning says little about whether the image
really changed the way the prompt asked (it can be gamed by adversarial pixels). This small CNN, trained on
ground-truth renders with the renderer's own attribute labels, gives the independent check: "after tuning
towards 'red hair', does a classifier that never saw CLIP say red hair?"

Entry points: :func:`train_from_preset` (notebook 06), :func:`load_attribute_classifier`,
:func:`attribute_probs`, :func:`accuracy`. It is trained with blur and noise augmentation so that it judges
VQ-decoded images (softer than the clean renders) as it judges renders.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import synth, training
from .runtime import Runtime, current
from .images import to_model

IGNORE = -100  # label of an image without this attribute (e.g. a distractor): left out of that head's loss
# what notebook 06's classifier tells apart: the renderer's own attribute values
CLASSES = {"hair_colour": list(synth.HAIR_COLOURS), "outfit_colour": list(synth.OUTFIT_COLOURS)}


def _block(cin: int, cout: int) -> nn.Sequential:
    g = math.gcd(8, cout)
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(g, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, stride=2), nn.GroupNorm(g, cout), nn.SiLU())


class AttributeNet(nn.Module):
    """A strided 4x4 stem (half resolution at once: colour regions need no full-resolution layers, and on
    CPU those cost most), a few strided conv blocks, global average + max pooling, one linear head per
    attribute. Average pooling says how much of a colour there is; max pooling says whether it is there."""

    def __init__(self, classes: Mapping[str, Sequence[str]], width: int = 32, depth: int = 3):
        super().__init__()
        self.classes = {k: list(v) for k, v in classes.items()}
        chans = [width * 2 ** min(i, 2) for i in range(depth)]
        blocks: list[nn.Module] = [nn.Conv2d(3, width, 4, stride=2, padding=1), nn.SiLU()]
        cin = width
        for c in chans:
            blocks.append(_block(cin, c))
            cin = c
        self.features = nn.Sequential(*blocks)
        self.heads = nn.ModuleDict({k: nn.Linear(2 * cin, len(v)) for k, v in self.classes.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images in [-1, 1] ``[N, 3, H, W]`` -> logits per attribute."""
        h = self.features(x)
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return {k: head(h) for k, head in self.heads.items()}


def _uint8_images(images: np.ndarray) -> np.ndarray:
    """The images as uint8 [N, H, W, 3] without a copy (a memory-mapped subset stays on disk), or a ValueError;
    callers convert them batch by batch."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
    return arr


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


def encode_labels(values: Sequence[str | None], classes: Sequence[str], name: str) -> torch.Tensor:
    """Class names -> indices (``None`` -> IGNORE); an unknown name is refused, naming the attribute."""
    index = {c: i for i, c in enumerate(classes)}
    bad = sorted({v for v in values if v is not None and v not in index})
    if bad:
        raise ValueError(f"attribute {name!r}: unknown value(s) {', '.join(map(str, bad))}; "
                         f"known: {', '.join(classes)}")
    return torch.tensor([IGNORE if v is None else index[v] for v in values], dtype=torch.long)


def train_attribute_classifier(images: np.ndarray, labels: Mapping[str, Sequence[str | None]],
                               classes: Mapping[str, Sequence[str]], ckpt_dir: str | Path, *, steps: int = 600,
                               batch_size: int = 64, lr: float = 2e-3, width: int = 32, depth: int = 3,
                               seed: int = 0, progress: bool = True, resume: bool = True,
                               runtime: Runtime | None = None):
    """Train on uint8 renders ``[N, H, W, 3]`` with ``labels[attr][i]`` a class name of ``classes[attr]``
    (or None when image i has no such attribute), through :func:`kpnb.training.train`, on ``runtime``'s
    device (default: the current runtime). Returns ``(model in eval mode, TrainResult)``."""
    rt = runtime or current()
    x_all = _uint8_images(images)
    y_all = {}
    for name, cls in classes.items():
        if name not in labels or len(labels[name]) != len(x_all):
            raise ValueError(f"labels[{name!r}] must have one entry per image ({len(x_all)})")
        y_all[name] = encode_labels(labels[name], cls, name)
    torch.manual_seed(seed)
    model = AttributeNet(classes, width=width, depth=depth).to(rt.device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)

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
    result = training.train({"attributes": model}, {"opt": opt}, step_fn, batch_fn, steps=steps,
                            ckpt_dir=ckpt_dir, config=config, batch_size=batch_size, seed=seed,
                            desc="attribute classifier", progress=progress, resume=resume, runtime=rt)
    return model.eval(), result


def labels_of(attrs: Sequence[Mapping[str, str | None]], classes: Mapping[str, Sequence[str]] = CLASSES
              ) -> dict[str, list[str | None]]:
    """Per attribute of ``classes``, each image's value from its ``attrs`` record (None where it has none)."""
    return {k: [a.get(k) for a in attrs] for k in classes}


def train_from_preset(section: Mapping[str, object], images: np.ndarray, attrs: Sequence[Mapping[str, str | None]],
                      ckpt_dir: str | Path, *, progress: bool = True, resume: bool = True):
    """:func:`train_attribute_classifier` on renders and their ``attrs`` records for :data:`CLASSES`, with the
    ``attr_steps``, ``attr_width``, ``attr_depth`` and ``seed`` of a preset's ``clip`` section."""
    return train_attribute_classifier(images, labels_of(attrs), CLASSES, ckpt_dir, steps=section["attr_steps"],
                                      width=section["attr_width"], depth=section["attr_depth"], seed=section["seed"],
                                      progress=progress, resume=resume)


def load_attribute_classifier(ckpt_dir: str | Path) -> AttributeNet:
    """The classifier trained into ``ckpt_dir`` (latest checkpoint), in eval mode."""
    cfg = training.read_checkpoint_info(ckpt_dir).get("config", {})  # width and depth sit beside the classes
    return training.load_trained(ckpt_dir, "classes",
                                 lambda classes: AttributeNet(classes, width=cfg["width"], depth=cfg["depth"]),
                                 module="attributes", what="attribute-classifier")


@torch.no_grad()
def attribute_probs(model: AttributeNet, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Class probabilities per attribute, ``{name: [N, K]}`` (columns in ``model.classes[name]`` order)."""
    model.eval()
    x = _uint8_images(images)
    dev = next(model.parameters()).device
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in model.classes}
    for i in range(0, len(x), batch_size):
        for k, v in model(to_model(x[i:i + batch_size]).to(dev)).items():
            outs[k].append(v.float().softmax(-1).cpu())
    return {k: torch.cat(v).numpy() if v else np.zeros((0, len(model.classes[k])), np.float32)
            for k, v in outs.items()}


def predict_attributes(model: AttributeNet, images: np.ndarray) -> dict[str, np.ndarray]:
    """The most likely class name per attribute: ``{name: array of N strings}``."""
    return {k: np.array(model.classes[k], dtype=object)[p.argmax(-1)] if len(p) else np.array([], dtype=object)
            for k, p in attribute_probs(model, images).items()}


def accuracy(model: AttributeNet, images: np.ndarray, labels: Mapping[str, Sequence[str | None]]) -> dict[str, float]:
    """Accuracy per attribute over the images that have it: ``{"hair_colour": 0.97, ...}``."""
    pred = predict_attributes(model, images)
    out = {}
    for k, truth in labels.items():
        if k not in pred:
            continue
        have = np.array([t is not None for t in truth])
        out[k] = float((pred[k][have] == np.array(truth, dtype=object)[have]).mean()) if have.any() else float("nan")
    return out
