import os
import pickle
import warnings

import numpy as np
import open_clip
import pytest
import torch

from kpnb.core import files, settings
from kpnb.evaluate import clip as clip_eval
from kpnb.models import attributes
from kpnb.models import clip as kc
from kpnb.train import attributes as attribute_training
from kpnb.train import clip as clip_training

TINY = kc.domain_clip_config(image_size=32, patch_size=8, width=32, layers=1, text_width=32, text_layers=1,
                             context_length=8, embed_dim=32)
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 50, 220)}


def _squares(n, seed=0, size=32):
    """A coloured square on a dark background; the label is the square's colour."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lab = rng.integers(0, len(names), n)
    ims = rng.integers(0, 60, (n, 1, 1, 3)).astype(np.uint8).repeat(size, 1).repeat(size, 2)
    for i, l in enumerate(lab):
        y, x = rng.integers(0, size // 2, 2)
        ims[i, y:y + size // 2, x:x + size // 2] = COLOURS[names[l]]
    return ims, lab, names


def test_offline_and_tokenizer_ships_with_open_clip():
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    tok = open_clip.SimpleTokenizer(context_length=10)
    ids = tok(["a girl with red hair"])[0].tolist()
    assert ids[:7] == [49406, 320, 1611, 593, 736, 2225, 49407] and ids[7:] == [0, 0, 0]


def test_pretrained_file_round_trip(tmp_path):
    model = kc.create_domain_clip(TINY, tmp_path, seed=3).eval()
    name = model.kpnb_arch
    assert name in open_clip.list_models()  # registered through open_clip's own config registry
    ims, _, _ = _squares(4)
    ref_img = kc.encode_images(model, ims)
    ref_txt = kc.encode_texts(model, ["a red square", "a blue square"])
    for fname in ("w.safetensors", "w.bin"):
        path = tmp_path / fname
        if fname.endswith(".safetensors"):
            files.save_tensors(path, model.state_dict())
        else:  # a plain torch state dict (tensors only): read with torch.load(weights_only=True)
            torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
        loaded = kc.load_pretrained(name, path)
        torch.testing.assert_close(kc.encode_images(loaded, ims), ref_img)
        torch.testing.assert_close(kc.encode_texts(loaded, ["a red square", "a blue square"]), ref_txt)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pretrained_refuses_code_pickles(tmp_path):
    path = tmp_path / "evil.bin"
    path.write_bytes(pickle.dumps({"x": _Evil()}, protocol=2))
    name = kc.register_architecture(TINY, tmp_path)
    with pytest.raises(files.UnsafeFileError):
        kc.load_pretrained(name, path)


def test_missing_weights_say_what_to_download(tmp_path):
    path = tmp_path / "nope" / "vit-b-32.safetensors"
    with pytest.raises(kc.ClipWeightsMissing) as e:
        kc.load_pretrained("ViT-B-32", path, tag="laion2b_s34b_b79k")
    msg = str(e.value)
    assert str(path) in msg and "laion2b_s34b_b79k" in msg and "huggingface.co/laion/" in msg
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        kc.load_pretrained("ViT-Q-99", path)
    with pytest.raises(ValueError, match="unknown open_clip release"):
        kc.load_pretrained("ViT-B-32", path, tag="not-a-tag")


def test_weights_of_another_architecture_are_refused(tmp_path):
    other = kc.create_domain_clip({**TINY, "embed_dim": 16}, tmp_path)
    files.save_tensors(tmp_path / "w.safetensors", other.state_dict())
    name = kc.register_architecture(TINY, tmp_path)
    with pytest.raises(ValueError, match="do not fit"):
        kc.load_pretrained(name, tmp_path / "w.safetensors")


def test_clip_input_resizes_and_normalises_differentiably(tmp_path):
    model = kc.create_domain_clip(TINY, tmp_path)
    cfg = kc.preprocess_cfg(model)
    x = torch.tensor(cfg["mean"]).view(1, 3, 1, 1).expand(2, 3, 64, 48).clone().requires_grad_(True)
    y = kc.clip_input(model, x)
    assert y.shape == (2, 3, 32, 32)
    assert y.abs().max() < 1e-4  # the mean colour normalises to zero
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_make_cutouts():
    x = torch.rand(3, 3, 16, 16)
    same = kc.make_cutouts(x, 2, 16, min_frac=1.0, max_frac=1.0, flip=False)
    assert same.shape == (6, 3, 16, 16)
    torch.testing.assert_close(same, x.repeat(2, 1, 1, 1))
    g = torch.Generator().manual_seed(0)
    flipped = kc.make_cutouts(x, 8, 16, min_frac=1.0, max_frac=1.0, flip=True, generator=g).view(8, 3, 3, 16, 16)
    is_same = (flipped - x).abs().flatten(2).amax(-1) < 1e-5
    is_flip = (flipped - x.flip(-1)).abs().flatten(2).amax(-1) < 1e-5
    assert (is_same | is_flip).all() and is_flip.any() and is_same.any()
    crops = kc.make_cutouts(x, 4, 8, min_frac=0.5, max_frac=0.5)
    assert crops.shape == (12, 3, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        kc.images_to_tensor(np.zeros((2, 8, 8, 3), np.float32))


def test_domain_clip_learns_zero_shot_and_reloads(tmp_path):
    ims, lab, names = _squares(96)
    caps = [[f"a {names[l]} square", names[l]] for l in lab]
    model, res = clip_training.train_domain_clip(ims, caps, {"steps": 60, "batch_size": 16, "lr": 3e-3, "warmup": 5},
                                                 tmp_path / "clip", model_cfg=TINY, progress=False)
    assert res.step == 60 and res.history[-1]["loss"] < res.history[0]["loss"]
    test, tlab, _ = _squares(60, seed=1)
    probs, pred = kc.zero_shot(model, test, [f"a {n} square" for n in names])
    assert probs.shape == (60, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (pred == tlab).mean() >= 0.9
    # the filter score: probability of the positive description against the negatives
    red = tlab == 0
    s = kc.clip_filter_scores(model, test, "a red square", ["a green square", "a blue square"])
    assert s.shape == (60,) and s[red].mean() > 0.8 and s[~red].mean() < 0.2
    # CLIP score: matching text scores higher than a wrong one
    assert kc.clip_score(model, test[red], "a red square").mean() > kc.clip_score(model, test[red], "a blue square").mean()
    again = clip_training.load_domain_clip(tmp_path / "clip")
    np.testing.assert_allclose(kc.clip_score(again, test[:5], "a red square"),
                               kc.clip_score(model, test[:5], "a red square"), atol=1e-4)


def test_attribute_classifier_reads_a_read_only_memmap_batch_by_batch(tmp_path):
    ims, lab, names = _squares(64, size=32)
    labels, classes = {"square": [names[l] for l in lab]}, {"square": names}
    np.save(tmp_path / "ims.npy", ims)
    mm = np.load(tmp_path / "ims.npy", mmap_mode="r")  # a big subset, as data.load_subset gives it
    kw = dict(steps=3, batch_size=16, width=8, depth=2)
    a, _ = attribute_training.train_attribute_classifier(ims, labels, classes, tmp_path / "a", kw, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no torch warning about a non-writable array
        b, _ = attribute_training.train_attribute_classifier(mm, labels, classes, tmp_path / "b", kw, progress=False)
        probs = attributes.attribute_probs(b, mm, batch_size=16)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    np.testing.assert_allclose(probs["square"], attributes.attribute_probs(a, ims)["square"], atol=1e-6)


def test_attribute_classifier_shapes_and_learning(tmp_path):
    ims, lab, names = _squares(128, size=32)
    other = np.random.default_rng(1).integers(0, 2, len(ims))
    ims[other == 1, -4:] = 255  # a second attribute: a white band at the bottom
    labels = {"square": [names[l] for l in lab], "band": [["no", "yes"][o] for o in other]}
    labels["band"][0] = None  # an image without this attribute is left out of that head's loss
    classes = {"square": names, "band": ["no", "yes"]}
    net = attributes.AttributeNet(classes, width=8, depth=2)
    logits = net(torch.zeros(5, 3, 32, 32))
    assert {k: tuple(v.shape) for k, v in logits.items()} == {"square": (5, 3), "band": (5, 2)}
    model, res = attribute_training.train_attribute_classifier(
        ims, labels, classes, tmp_path / "attr", {"steps": 60, "batch_size": 32, "lr": 5e-3, "width": 8, "depth": 2},
        progress=False)
    pred = attributes.predict_attributes(model, ims[:7])
    assert set(pred) == {"square", "band"} and pred["square"].shape == (7,) and set(pred["square"]) <= set(names)
    acc = clip_eval.accuracy(model, ims, labels)
    assert acc["square"] >= 0.9 and acc["band"] >= 0.9
    again = attribute_training.load_attribute_classifier(tmp_path / "attr")
    assert (attributes.predict_attributes(again, ims[:7])["square"] == pred["square"]).all()
    with pytest.raises(ValueError, match="not a attribute-classifier checkpoint"):
        attribute_training.load_attribute_classifier(kc_trained_elsewhere(tmp_path))
    with pytest.raises(ValueError, match="unknown value"):
        attributes.encode_labels(["red", "pink"], names, "square")


def kc_trained_elsewhere(tmp_path):
    """A checkpoint folder of another model (a 1-step domain CLIP)."""
    ims, lab, names = _squares(4)
    clip_training.train_domain_clip(ims, [names[l] for l in lab], {"steps": 1, "batch_size": 4}, tmp_path / "other",
                                    model_cfg=TINY, progress=False)
    return tmp_path / "other"


def test_attribute_classifier_from_preset_on_render_records(tmp_path):
    sec = settings.preset_config("smoke")["clip"]
    ims, _, _ = _squares(8)
    attrs = [{"hair_colour": "red", "outfit_colour": "blue"}, {"hair_colour": "black"}] * 4
    labels = attributes.labels_of(attrs)
    assert list(labels) == ["hair_colour", "outfit_colour"] and labels["outfit_colour"][:2] == ["blue", None]
    model, res = attribute_training.train_from_preset(sec, ims, attrs, tmp_path / "attr", progress=False)
    assert res.step == sec["attr_steps"] and model.classes == attributes.CLASSES
    assert set(clip_eval.accuracy(model, ims, labels)) == {"hair_colour", "outfit_colour"}


def test_zero_shot_confusion_counts_labelled_images(tmp_path):
    model = kc.create_domain_clip(TINY, tmp_path, seed=0).eval()
    ims, lab, names = _squares(6)
    labels = [names[l] for l in lab]
    labels[0] = None  # no label: left out
    acc, conf = clip_eval.zero_shot_confusion(model, ims, labels, names, prompt=lambda c: f"a {c} square")
    _, pred = kc.zero_shot(model, ims[1:], [f"a {n} square" for n in names])
    assert conf.shape == (3, 3) and conf.sum() == 5 and np.trace(conf) == (pred == lab[1:]).sum()
    assert conf.sum(1).tolist() == np.bincount(lab[1:], minlength=3).tolist() and acc == np.trace(conf) / 5
    hair, _ = clip_eval.zero_shot_confusion(model, ims, ["red"] * 6, ["red", "blue"])  # asked as hair prompts
    assert 0 <= hair <= 1


def test_caption_variants_cover_filter_prompts_and_attributes():
    from kpnb.data.filtering import CLIP_NEGATIVES, CLIP_POSITIVE

    assert set(kc.LABEL_DESCRIPTIONS.values()) == {CLIP_POSITIVE, *CLIP_NEGATIVES}
    rec = {"label": "suitable", "caption": "anime girl, long red hair, a blue dress",
           "attributes": {"hair_colour": "red", "outfit": "dress", "outfit_colour": "blue"}}
    assert clip_training.caption_variants(rec) == ["anime girl, long red hair, a blue dress", CLIP_POSITIVE,
                                        "a girl with red hair", "a girl with red hair and a blue dress"]
    sketch = {"label": "sketch", "caption": "a monochrome line sketch of a girl", "attributes": {"hair_colour": "red"}}
    assert clip_training.caption_variants(sketch) == ["a monochrome line sketch of a girl", "a monochrome sketch"]
    assert clip_training.caption_variants(None, tags=["1girl", "red_hair"]) == ["1girl, red hair"]
    with pytest.raises(ValueError):
        clip_training.caption_variants({})


def test_smoke_preset_trains(tmp_path):
    sec = settings.preset_config("smoke")["clip"]
    ims, lab, names = _squares(16, size=sec["image_size"])
    model, res = clip_training.train_from_preset(sec, ims, [f"a {names[l]} square" for l in lab], tmp_path, progress=False)
    assert res.step == sec["steps"] and kc.preprocess_cfg(model)["size"] == (32, 32)


def test_bench_clip_reports_training_and_tuning_speed():
    from kpnb.run import bench

    r = bench.bench_clip("smoke", steps=1, gpu_config=False)
    d = r["domain_clip"]
    assert d["params_M"] > 0 and d["train.gflop_per_image"] > 0 and d["train.images_per_s"] > 0
    (t,) = d["tuning"]
    assert t["spec"] == "f4" and t["n_images"] == 2 and t["tune.iterations_per_s"] > 0
