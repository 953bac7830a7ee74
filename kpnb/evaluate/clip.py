"""Zero-shot classification with CLIP and the attribute classifier's accuracy."""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from kpnb.models.attributes import AttributeNet, predict_attributes

# Offline before open_clip (and with it huggingface_hub) is imported: huggingface_hub reads this once.
os.environ["HF_HUB_OFFLINE"] = "1"



from kpnb.models.clip import hair_prompt, zero_shot


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


def zero_shot_confusion(model: torch.nn.Module, images: np.ndarray, labels: Sequence[str | None],
                        classes: Sequence[str], prompt: Callable[[str], str] | None = None) -> tuple[float, np.ndarray]:
    """Zero-shot classification of ``images`` among ``classes``, each asked as ``prompt(class)`` (default
    :func:`hair_prompt`), against ``labels`` (a class per image; None leaves the image out). Returns
    ``(accuracy, confusion counts [K, K])``, rows the true class, columns CLIP's."""
    prompt = prompt or hair_prompt
    classes = list(classes)
    have = np.array([label is not None for label in labels])
    _, pred = zero_shot(model, np.asarray(images)[have], [prompt(c) for c in classes])
    truth = np.array([classes.index(label) for label in np.array(labels, dtype=object)[have]])
    conf = np.zeros((len(classes), len(classes)), int)
    np.add.at(conf, (truth, pred), 1)
    return float((pred == truth).mean()), conf
