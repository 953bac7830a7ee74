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
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kpnb import synth
from kpnb.core.images import check_uint8_images, to_model

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


def encode_labels(values: Sequence[str | None], classes: Sequence[str], name: str) -> torch.Tensor:
    """Class names -> indices (``None`` -> IGNORE); an unknown name is refused, naming the attribute."""
    index = {c: i for i, c in enumerate(classes)}
    bad = sorted({v for v in values if v is not None and v not in index})
    if bad:
        raise ValueError(f"attribute {name!r}: unknown value(s) {', '.join(map(str, bad))}; "
                         f"known: {', '.join(classes)}")
    return torch.tensor([IGNORE if v is None else index[v] for v in values], dtype=torch.long)


def labels_of(attrs: Sequence[Mapping[str, str | None]], classes: Mapping[str, Sequence[str]] = CLASSES
              ) -> dict[str, list[str | None]]:
    """Per attribute of ``classes``, each image's value from its ``attrs`` record (None where it has none)."""
    return {k: [a.get(k) for a in attrs] for k in classes}


@torch.no_grad()
def attribute_probs(model: AttributeNet, images: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Class probabilities per attribute, ``{name: [N, K]}`` (columns in ``model.classes[name]`` order)."""
    model.eval()
    x = check_uint8_images(images, single=True)
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
