"""kpnb.evaluate.edits: numbers that tell a semantic edit from a pixel-wise one."""
import numpy as np
import pytest
import torch

from kpnb.evaluate import edits
from kpnb.models import attributes


def _smooth_images(n=4, size=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    base = [128 + 60 * np.sin(2 * np.pi * (a * xx + b * yy))[..., None] * np.array(c)
            for a, b, c in zip(rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 1.5, n), rng.uniform(-1, 1, (n, 3)))]
    return np.clip(np.stack(base), 0, 255).astype(np.uint8)


def test_saturation():
    grey = np.full((1, 4, 4, 3), 128, np.uint8)
    red = np.zeros((1, 4, 4, 3), np.uint8)
    red[..., 0] = 200
    assert edits.saturation(grey)[0] == 0.0 and edits.saturation(red)[0] == pytest.approx(1.0)


def test_noise_is_high_frequency_and_a_recoloured_region_is_not():
    before = _smooth_images()
    rng = np.random.default_rng(1)
    noisy = np.clip(before + rng.normal(0, 20, before.shape), 0, 255).astype(np.uint8)
    recoloured = before.copy()
    recoloured[:, 4:20, 6:26] = np.clip(recoloured[:, 4:20, 6:26].astype(int) + [60, -40, 0], 0, 255)  # a region
    hf_noise, hf_region = edits.high_freq_share(before, noisy), edits.high_freq_share(before, recoloured)
    assert np.all(hf_noise > 0.7) and np.all(hf_region < 0.2), (hf_noise, hf_region)  # white noise: ~0.80
    assert np.isnan(edits.high_freq_share(before, before)).all()
    with pytest.raises(ValueError, match="one shape"):
        edits.high_freq_share(before, before[:, :16])


def test_attribute_changes_count_calls_that_moved():
    torch.manual_seed(0)
    model = attributes.AttributeNet({"hair_colour": ["red", "blue", "green"]}, width=8, depth=1).eval()
    before = _smooth_images(6)
    calls = attributes.attribute_probs(model, before)["hair_colour"].argmax(-1)
    same = edits.attribute_changes(model, before, before)
    assert same["changed"] == 0.0 and same["distinct_before"] == same["distinct_after"] == len(set(calls))
    assert same["entropy_before"] == pytest.approx(same["entropy_after"])
    flipped = edits.attribute_changes(model, before, 255 - before)
    want = (attributes.attribute_probs(model, 255 - before)["hair_colour"].argmax(-1) != calls).mean()
    assert flipped["changed"] == pytest.approx(want)
    d = edits.describe_edit(before, 255 - before, model)
    assert d["hair_colour.changed"] == flipped["changed"] and 0 <= d["high_freq_share"] <= 1
    assert d["saturation_before"] == pytest.approx(edits.saturation(before).mean())
    with pytest.raises(ValueError, match="not one the classifier knows"):
        edits.attribute_changes(model, before, before, "eye_colour")
