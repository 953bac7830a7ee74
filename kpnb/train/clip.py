"""Training the small domain CLIP on captions of the synthetic pool."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

# Offline before open_clip (and with it huggingface_hub) is imported: huggingface_hub reads this once.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402

from kpnb.core.runtime import Runtime, current
from kpnb.models.clip import (
    LABEL_DESCRIPTIONS,
    DomainClipArch,
    clip_input,
    create_domain_clip,
    domain_clip_config,
    hair_prompt,
    images_to_tensor,
    make_cutouts,
    model_config_from_preset,
    preprocess_cfg,
    tokenizer_for,
)
from kpnb.train import checkpoints
from kpnb.train import loop as training


def caption_variants(label: Mapping[str, Any] | None = None, tags: Sequence[str] = ()) -> list[str]:
    """Captions for one training image, of which each training step draws one.

    Synthetic data (a ``labels.jsonl`` record): the generator's caption, the short description of its
    kind (:data:`LABEL_DESCRIPTIONS`) and short attribute phrases ("a girl with red hair", "... and a blue
    dress"), so that short prompts - the ones zero-shot evaluation, the filter and tuning use - are in
    distribution. Real data: the Danbooru tags as a comma-separated caption (underscores to spaces)."""
    caps: list[str] = []
    if label:
        if label.get("caption"):
            caps.append(str(label["caption"]))
        if label.get("label") in LABEL_DESCRIPTIONS:
            caps.append(LABEL_DESCRIPTIONS[label["label"]])
        a = label.get("attributes") or {}
        if a.get("hair_colour") and label.get("label") != "sketch":  # sketches have no colour to see
            caps.append(hair_prompt(a["hair_colour"]))
            if a.get("outfit_colour"):
                garment = "dress" if a.get("outfit") == "dress" else "skirt"
                caps.append(f"{hair_prompt(a['hair_colour'])} and a {a['outfit_colour'].replace('_', ' ')} {garment}")
    if tags:
        caps.append(", ".join(t.replace("_", " ") for t in tags))
    if not caps:
        raise ValueError("caption_variants: no caption, label or tags to describe this image")
    return caps


#: The keys of a preset's ``clip`` section that drive :func:`train_domain_clip`.
TRAIN_KEYS = ("steps", "batch_size", "lr", "warmup", "weight_decay", "min_frac", "seed", "ckpt_every")
#: What :func:`train_domain_clip` uses for a key of :data:`TRAIN_KEYS` its settings lack (all but ``steps``).
TRAIN_DEFAULTS = {"batch_size": 64, "lr": 1e-3, "weight_decay": 0.1, "warmup": 50, "min_frac": 0.8, "seed": 0,
                  "ckpt_every": 500}


def train_domain_clip(images: np.ndarray, captions: Sequence[str | Sequence[str]], settings: Mapping[str, Any],
                      ckpt_dir: str | Path, *, model_cfg: Mapping[str, Any] | None = None, progress: bool = True,
                      resume: bool = True, runtime: Runtime | None = None):
    """Train a domain CLIP with the contrastive (InfoNCE) loss of open_clip on ``images`` (uint8
    ``[N, H, W, 3]``) and their ``captions`` (one string, or several variants of which each step draws one),
    through :func:`kpnb.train.loop.train` (checkpoints and resume in ``ckpt_dir``).

    ``settings``: ``steps`` and any other key of :data:`TRAIN_KEYS` (a preset's ``clip`` section will do; the
    missing keys take :data:`TRAIN_DEFAULTS`, other keys are ignored). ``model_cfg``: an open_clip config
    (default :func:`kpnb.models.clip.domain_clip_config` at the images' size). Images are augmented like tuning
    cutouts (a random crop of ``min_frac``..1 of the side, mirrored), never in colour: colour is what the
    captions talk about. Under several ranks (``runtime``) each rank encodes its slice and the loss is taken
    over the whole global batch (open_clip's feature gather), as one process would. Returns
    ``(model, TrainResult)``."""
    if "steps" not in settings:
        raise KeyError("train_domain_clip: settings need 'steps'")
    s = {**TRAIN_DEFAULTS, **{k: settings[k] for k in TRAIN_KEYS if k in settings}}
    steps, batch_size, lr, warmup = s["steps"], s["batch_size"], s["lr"], s["warmup"]
    weight_decay, min_frac, seed = s["weight_decay"], s["min_frac"], s["seed"]
    rt = runtime or current()
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    variants = [[c] if isinstance(c, str) else list(c) for c in captions]
    if any(not v for v in variants):
        raise ValueError("every image needs at least one caption")
    ckpt_dir = Path(ckpt_dir)
    model_cfg = dict(model_cfg or domain_clip_config(DomainClipArch(image_size=int(np.asarray(images).shape[1]))))
    model = create_domain_clip(model_cfg, ckpt_dir, seed=seed).to(rt.device)
    tok = tokenizer_for(model)
    size = preprocess_cfg(model)["size"]
    x_all = images_to_tensor(images)  # [N, 3, H, W] in [0, 1], kept in memory (6000 x 64^2 x 3 floats = 300 MB)
    loss_fn = open_clip.ClipLoss(gather_with_grad=True, rank=rt.rank, world_size=rt.world_size)
    net = rt.ddp(model, "clip")
    # No weight decay on gains, biases, embeddings and the temperature (as in CLIP / open_clip training).
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6,
                            fused=True)

    def batch_fn(step: int):
        g = training.seeded_generator(seed, step)
        idx = training.batch_indices(len(x_all), batch_size, step, seed=seed)
        x = make_cutouts(x_all[idx], 1, size, min_frac=min_frac, generator=g)
        pick = torch.randint(0, 1 << 30, (len(idx),), generator=g).tolist()
        texts = [variants[i][r % len(variants[i])] for i, r in zip(idx.tolist(), pick)]
        return x, tok(texts)

    def step_fn(step: int, batch):
        x, t = batch
        training.set_lr(opt, training.warmup_cosine(step, steps, lr, warmup=warmup))
        with rt.autocast():
            img, txt, scale = net(clip_input(model, x), t)  # open_clip's forward: normalised features
        loss = loss_fn(img.float(), txt.float(), scale.float())
        rt.backward_step(loss, opt)
        with torch.no_grad():  # CLIP's cap on the temperature: logit scale at most 100
            model.logit_scale.clamp_(0, math.log(100))
        return {"loss": loss, "logit_scale": model.logit_scale.exp()}

    config = {"model_cfg": model_cfg, "arch": model.kpnb_arch, "batch_size": batch_size, "lr": lr,
              "weight_decay": weight_decay, "warmup": warmup, "min_frac": min_frac, "n_images": len(x_all)}
    loop = training.LoopSettings(steps=steps, ckpt_dir=ckpt_dir, config=config, batch_size=batch_size,
                                 ckpt_every=s["ckpt_every"], seed=seed, desc="domain CLIP", resume=resume,
                                 progress=progress)
    result = training.train({"clip": model}, {"opt": opt}, step_fn, batch_fn, loop, runtime=rt)
    return model.eval(), result


def train_from_preset(section: Mapping[str, Any], images: np.ndarray, captions: Sequence[str | Sequence[str]],
                      ckpt_dir: str | Path, *, progress: bool = True, resume: bool = True,
                      runtime: Runtime | None = None):
    """:func:`train_domain_clip` with the model and training settings of a preset's ``clip`` section."""
    return train_domain_clip(images, captions, section, ckpt_dir, model_cfg=model_config_from_preset(section),
                             progress=progress, resume=resume, runtime=runtime)


def load_domain_clip(ckpt_dir: str | Path, device: str = "cpu") -> torch.nn.Module:
    """The domain CLIP trained into ``ckpt_dir`` by :func:`train_domain_clip` (its latest checkpoint), in
    eval mode. The architecture comes from the checkpoint's config and is registered with open_clip again."""
    ckpt_dir = Path(ckpt_dir)
    if checkpoints.latest_checkpoint(ckpt_dir) is None:
        raise FileNotFoundError(f"{ckpt_dir}: no domain CLIP checkpoint here - train one with "
                                f"kpnb.train.clip.train_domain_clip (notebook 06)")
    model = checkpoints.load_trained(ckpt_dir, "model_cfg", lambda cfg: create_domain_clip(cfg, ckpt_dir),
                                  module="clip", what="kpnb domain CLIP")
    return model.to(device).eval()
