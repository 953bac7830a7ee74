"""CLIP through open_clip: pretrained weights from a local file, a small domain CLIP, scoring.

Two kinds of CLIP serve the workbook:

* **pretrained**: any open_clip architecture with weights from a file a person downloaded
  (:func:`load_pretrained`). Nothing is ever downloaded (``HF_HUB_OFFLINE=1``); the file is read by
  :func:`kpnb.core.files.load_tensors` (safetensors, or a pickle through ``torch.load(weights_only=True)``),
  never by a plain unpickler.
* **domain**: a tiny open_clip model (ViT image tower for 64x64 images, a small text transformer with
  open_clip's own BPE tokenizer) made from a custom config registered with ``open_clip.add_model_config``
  and trained contrastively on the synthetic captions (:func:`train_domain_clip`). It is what the cpu
  preset uses: no pretrained CLIP can be fetched offline, and a 224 px ViT-B would cost far more per image
  on a few CPU cores.

:func:`clip_for_run` gives a run folder's CLIP (notebooks 01 and 06); :func:`zero_shot`,
:func:`zero_shot_confusion` and :func:`clip_filter_scores` classify, :func:`clip_score` scores.
``docs/metrics.md`` defines the zero-shot accuracy notebook 06 reports.

Images enter as uint8 arrays ``[N, H, W, 3]`` (or one ``[H, W, 3]``); :func:`clip_input` turns float
images in [0, 1] into the model's input (resize, centre crop, normalise) differentiably, so that CLIP
tuning can back-propagate through it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

# Offline before open_clip (and with it huggingface_hub) is imported: huggingface_hub reads this once.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from open_clip.convert import convert_state_dict  # noqa: E402
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed  # noqa: E402

from kpnb.core.files import load_tensors, write_json
from kpnb.core.images import check_uint8_images

DOMAIN_PREFIX = "kpnb-domain-clip"


@contextmanager
def _quiet_open_clip():
    """open_clip logs a root-logger warning for every model created without its own weights ("initialized
    randomly"); here a model is always loaded or trained right after, so hide it."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


class ClipWeightsMissing(FileNotFoundError):
    """A pretrained-weights file that is not there; the message says what to download and where to put it."""


# ---- images in, model input out ------------------------------------------------------------------------
def images_to_tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` or ``[H, W, 3]`` -> float ``[N, 3, H, W]`` in [0, 1]. A float tensor
    ``[N, 3, H, W]`` is taken to be in [0, 1] already and passed through."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be [N, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
        return images
    arr = check_uint8_images(images, single=True)
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div(255.0)


def tensor_to_images(x01: torch.Tensor) -> np.ndarray:
    """float ``[N, 3, H, W]`` in [0, 1] -> uint8 ``[N, H, W, 3]``."""
    return (x01.detach().clamp(0, 1).mul(255).round().byte().permute(0, 2, 3, 1).cpu().numpy())


def preprocess_cfg(model: torch.nn.Module) -> dict[str, Any]:
    """The model's image size, mean and std (set by open_clip at creation)."""
    cfg = dict(open_clip.get_model_preprocess_cfg(model))
    size = cfg.get("size", model.visual.image_size)
    cfg["size"] = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    return cfg


def clip_input(model: torch.nn.Module, x01: torch.Tensor) -> torch.Tensor:
    """Float images ``[N, 3, H, W]`` in [0, 1] -> the model's normalised input, differentiably.
    Resize the shortest side to the model size (bicubic, antialiased like PIL) and centre-crop, which is
    open_clip's own eval transform for square models."""
    cfg = preprocess_cfg(model)
    th, tw = cfg["size"]
    h, w = x01.shape[-2:]
    if (h, w) != (th, tw):
        scale = max(th / h, tw / w)
        nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
        x01 = F.interpolate(x01, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        x01 = x01[..., top:top + th, left:left + tw]
    mean = torch.tensor(cfg["mean"], dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"], dtype=x01.dtype, device=x01.device).view(1, 3, 1, 1)
    return (x01 - mean) / std


def make_cutouts(x01: torch.Tensor, n: int, size: int | tuple[int, int], *, min_frac: float = 0.75,
                 max_frac: float = 1.0, flip: bool = True, noise: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` random square crops per image (side a random fraction of the shorter side, anywhere inside),
    resampled to ``size``, mirrored at random and with a little per-cutout Gaussian noise (std uniform in
    [0, ``noise``]): ``[N, 3, H, W]`` -> ``[n * N, 3, *size]``, cutout-major. The same augmentation trains
    the domain CLIP (``n=1``) and feeds CLIP during tuning, so tuning only asks about crops of the kind the
    model has seen. One ``grid_sample`` call, differentiable in ``x01``."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if min(x01.shape[-2:]) > min(size):  # shrink first (antialiased) so crops are not aliased by sampling
        x01 = F.interpolate(x01, scale_factor=min(size) / min(x01.shape[-2:]), mode="bilinear",
                            align_corners=False, antialias=True)
    N, C, H, W = x01.shape
    dev, dt = x01.device, x01.dtype
    frac = torch.empty(n * N).uniform_(min_frac, max_frac, generator=generator)
    sx, sy = frac * min(H, W) / W, frac * min(H, W) / H  # half-extent of the crop in [-1, 1] units
    cx = (torch.rand(n * N, generator=generator) * 2 - 1) * (1 - sx)
    cy = (torch.rand(n * N, generator=generator) * 2 - 1) * (1 - sy)
    mirror = torch.where(torch.rand(n * N, generator=generator) < 0.5, -1.0, 1.0) if flip else torch.ones(n * N)
    theta = torch.zeros(n * N, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = sx * mirror, cx
    theta[:, 1, 1], theta[:, 1, 2] = sy, cy
    grid = F.affine_grid(theta.to(dev, dt), [n * N, C, *size], align_corners=False)
    out = F.grid_sample(x01.repeat(n, 1, 1, 1), grid, mode="bilinear", padding_mode="border", align_corners=False)
    if noise > 0:
        sig = torch.rand(n * N, 1, 1, 1, generator=generator).to(dev, dt) * noise
        out = out + sig * torch.randn(out.shape, generator=generator).to(dev, dt)
    return out


# ---- tokenizer and encoders ----------------------------------------------------------------------------
def tokenizer_for(model: torch.nn.Module) -> Callable[[Sequence[str]], torch.Tensor]:
    """The tokenizer a model was made with (set by this module's loaders), else open_clip's BPE
    ``SimpleTokenizer`` (its vocabulary ships inside the package, so this works offline)."""
    tok = getattr(model, "kpnb_tokenizer", None)
    if tok is None:
        tok = open_clip.SimpleTokenizer(context_length=int(getattr(model, "context_length", 77)))
        model.kpnb_tokenizer = tok
    return tok


def _as_texts(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def encode_texts(model: torch.nn.Module, texts: str | Sequence[str]) -> torch.Tensor:
    """Unit-norm text embeddings ``[T, D]`` (no gradient: texts are targets, not optimised)."""
    tokens = tokenizer_for(model)(_as_texts(texts))
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model.encode_text(tokens.to(dev), normalize=True).float()


def encode_image_tensor(model: torch.nn.Module, x01: torch.Tensor) -> torch.Tensor:
    """Unit-norm image embeddings of float images in [0, 1], with gradient (for tuning)."""
    return model.encode_image(clip_input(model, x01), normalize=True).float()


def encode_images(model: torch.nn.Module, images: np.ndarray | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Unit-norm image embeddings ``[N, D]`` of uint8 images ``[N, H, W, 3]`` (no gradient)."""
    x = images_to_tensor(images)
    dev = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            outs.append(encode_image_tensor(model, x[i:i + batch_size].to(dev)))
    return torch.cat(outs) if outs else torch.zeros(0, int(getattr(model.visual, "output_dim", 0)))


# ---- scores --------------------------------------------------------------------------------------------
def clip_score(model: torch.nn.Module, images: np.ndarray | torch.Tensor, texts: str | Sequence[str]) -> np.ndarray:
    """100 x cosine of each image with its text (one text for all, or one per image): ``[N]``."""
    img = encode_images(model, images)
    txt = encode_texts(model, texts)
    if len(txt) not in (1, len(img)):
        raise ValueError(f"clip_score: {len(img)} images but {len(txt)} texts (give one, or one per image)")
    return (100.0 * (img * txt).sum(-1)).cpu().numpy()


def class_embeddings(model: torch.nn.Module, class_prompts: Sequence[str | Sequence[str]]) -> torch.Tensor:
    """One unit vector per class; a class given as several prompts gets their mean (prompt ensembling,
    as in CLIP's zero-shot ImageNet)."""
    rows = []
    for prompts in class_prompts:
        e = encode_texts(model, prompts).mean(0)
        rows.append(e / e.norm())
    return torch.stack(rows)


def zero_shot(model: torch.nn.Module, images: np.ndarray | torch.Tensor,
              class_prompts: Sequence[str | Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-shot classification: softmax over ``logit_scale * cosine`` with each class's prompt(s).
    Returns ``(probs [N, K], preds [N])``."""
    if len(class_prompts) < 2:
        raise ValueError("zero_shot needs at least two classes")
    img = encode_images(model, images)
    cls = class_embeddings(model, class_prompts).to(img.device)
    scale = float(model.logit_scale.detach().exp().clamp(max=100.0))
    probs = (scale * img @ cls.T).softmax(-1).cpu().numpy()
    return probs, probs.argmax(-1)


def clip_filter_scores(model: torch.nn.Module, images: np.ndarray, positive: str, negatives: Sequence[str]) -> np.ndarray:
    """Probability of the ``positive`` description against the ``negatives`` (softmax over the
    descriptions), per image ``[N]``: the dataset filter's CLIP stage keeps images above a threshold."""
    if not negatives:
        raise ValueError("clip_filter_scores needs at least one negative description")
    probs, _ = zero_shot(model, images, [positive, *negatives])
    return probs[:, 0].astype(np.float32)


# ---- pretrained weights from a local file --------------------------------------------------------------
def _download_hint(arch: str, path: Path, tag: str | None) -> str:
    tags = open_clip.list_pretrained_tags_by_model(arch)
    lines = [f"{path}: CLIP weights file not found (nothing is downloaded while kpnb runs)."]
    if tags:
        t = tag if tag in tags else tags[0]
        cfg = open_clip.get_pretrained_cfg(arch, t) or {}
        lines.append(f"open_clip release names for {arch}: {', '.join(tags)}.")
        where = []
        if cfg.get("hf_hub"):
            where.append(f"https://huggingface.co/{cfg['hf_hub'].rstrip('/')} "
                         "(file open_clip_model.safetensors, or open_clip_pytorch_model.bin)")
        if cfg.get("url"):
            where.append(cfg["url"])
        lines.append(f"For example {arch!r} + {t!r}: download " + " or ".join(where or ["it"]) +
                     f", put it at {path}, and pass tag={t!r} so its preprocessing is used.")
    else:
        lines.append(f"open_clip lists no released weights for {arch!r}; point at a file trained for it.")
    return "\n".join(lines)


def load_state_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load a CLIP state dict into an open_clip model, with open_clip's own key conversions (third-party
    layouts, old text-tower names, resized position embeddings), strictly."""
    state = dict(state)
    if isinstance(state.get("state_dict"), Mapping):  # training checkpoints wrap the weights
        state = dict(state["state_dict"])
    if state and next(iter(state)).startswith("module."):  # saved from DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    state = convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = convert_to_custom_text_state_dict(state)
    for k in ("logit_scale", "logit_bias"):
        p = getattr(model, k, None)
        if k in state and p is not None and state[k].ndim != p.ndim:
            state[k] = state[k].reshape(p.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = torch.zeros_like(model.logit_bias)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    model.load_state_dict(state, strict=True)


def load_pretrained(arch: str, path: str | Path, tag: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """An open_clip model ``arch`` (e.g. ``"ViT-B-32"``, or a registered custom name) with weights from
    the local file ``path`` (``.safetensors``, a ``.bin``/``.pt`` state dict, or big_vision ``.npz``).

    ``tag`` names the open_clip release the file came from (e.g. ``"laion2b_s34b_b79k"``); it only picks
    that release's preprocessing (mean, std) and QuickGELU setting - nothing is downloaded. Returns the
    model in eval mode with its tokenizer attached (:func:`tokenizer_for`)."""
    path = Path(path).expanduser()
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}; known: {', '.join(open_clip.list_models())}")
    if tag is not None and open_clip.get_pretrained_cfg(arch, tag) in (None, {}):
        raise ValueError(f"unknown open_clip release {tag!r} for {arch}; known: "
                         f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'}")
    if not path.is_file():
        raise ClipWeightsMissing(_download_hint(arch, path, tag))
    tag_cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    pp = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in tag_cfg}
    try:
        # Random init only: no tag, no file, no tower weights, so open_clip has nothing to fetch.
        with _quiet_open_clip():
            model = open_clip.create_model(arch, pretrained=None, device=device, pretrained_image=False,
                                           pretrained_text=False,
                                           force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
                                           force_preprocess_cfg=pp or None)
    except OSError as e:  # e.g. a Hugging Face text tower whose config is not cached
        raise RuntimeError(f"{arch}: building the model needs files that are not available offline ({e})") from e
    if path.suffix in (".npz", ".npy"):
        open_clip.load_checkpoint(model, str(path))  # numpy archive, read without pickles
    else:
        state, _ = load_tensors(path)  # safetensors, or torch.load(weights_only=True); refuses code pickles
        try:
            load_state_into(model, state)
        except RuntimeError as e:
            raise ValueError(f"{path}: weights do not fit open_clip architecture {arch!r} "
                             f"({str(e).splitlines()[0][:300]})") from e
    model.kpnb_tokenizer = open_clip.get_tokenizer(arch)
    return model.to(device).eval()


# ---- captions for the domain CLIP ---------------------------------------------------------------------
# What each kind of candidate looks like, in the words the filter's CLIP stage asks about
# (kpnb.data.filtering.CLIP_POSITIVE / CLIP_NEGATIVES). "estimator_failure" and "rating" images look like suitable
# ones (only their keypoint file or rating is wrong), so CLIP is told nothing else about them.
SUITABLE_DESCRIPTION = "a single anime character with a visible pose"
LABEL_DESCRIPTIONS: dict[str, str] = {
    "suitable": SUITABLE_DESCRIPTION, "estimator_failure": SUITABLE_DESCRIPTION, "rating": SUITABLE_DESCRIPTION,
    "multiple": "several characters", "scenery": "scenery without people", "comic": "a comic page",
    "sketch": "a monochrome sketch", "border": "an image with big black borders",
}


def hair_prompt(colour: str) -> str:
    """The prompt for a hair colour, as used for zero-shot evaluation and tuning."""
    return f"a girl with {colour.replace('_', ' ')} hair"


# ---- the domain CLIP -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DomainClipArch:
    """The shape of a tiny CLIP: a ViT of ``layers`` blocks of ``width`` channels over ``patch_size`` patches of
    ``image_size`` images; a causal text transformer of ``text_layers`` blocks of ``text_width`` over
    ``context_length`` tokens; attention heads of ``head_width`` channels, MLPs ``mlp_ratio`` times the width,
    a shared embedding of ``embed_dim``, and the temperature's starting logit ``init_logit_scale``."""
    image_size: int = 64
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    text_width: int = 64
    text_layers: int = 2
    context_length: int = 32
    embed_dim: int = 64
    head_width: int = 32
    mlp_ratio: float = 2.0
    init_logit_scale: float = math.log(30.0)


def domain_clip_config(arch: DomainClipArch | None = None, **fields: Any) -> dict[str, Any]:
    """An open_clip model config (the JSON open_clip's ``model_configs/`` hold) for a tiny CLIP of ``arch``
    (default :class:`DomainClipArch`), any of its fields replaced by keyword (``image_size=32``): a ViT and a
    causal text transformer over open_clip's 49408-token BPE vocabulary (most of the ~3.4M parameters of the
    defaults are that token table). The temperature starts at 1/30 rather than CLIP's 1/14.3: with few, close
    concepts (eight hair colours) the sharper softmax learns them faster."""
    a = dataclasses.replace(arch or DomainClipArch(), **fields)
    if a.image_size % a.patch_size:
        raise ValueError(f"image_size {a.image_size} is not a multiple of patch_size {a.patch_size}")
    return {
        "embed_dim": a.embed_dim,
        "init_logit_scale": float(a.init_logit_scale),
        "vision_cfg": {"image_size": a.image_size, "layers": a.layers, "width": a.width, "head_width": a.head_width,
                       "patch_size": a.patch_size, "mlp_ratio": a.mlp_ratio},
        "text_cfg": {"context_length": a.context_length, "vocab_size": 49408, "width": a.text_width,
                     "heads": max(1, a.text_width // a.head_width), "layers": a.text_layers,
                     "mlp_ratio": a.mlp_ratio},
    }


MODEL_KEYS = ("image_size", "patch_size", "width", "layers", "text_width", "text_layers", "context_length",
              "embed_dim")


def model_config_from_preset(section: Mapping[str, Any]) -> dict[str, Any]:
    """The domain CLIP config of a preset's ``clip`` section."""
    return domain_clip_config(DomainClipArch(**{k: section[k] for k in MODEL_KEYS if k in section}))


def register_architecture(model_cfg: Mapping[str, Any], folder: str | Path) -> str:
    """Write ``model_cfg`` as ``<folder>/<name>.json`` and register it with open_clip
    (``open_clip.add_model_config``); return the name. The name carries a hash of the config, so two
    configs never shadow each other in open_clip's global registry."""
    digest = hashlib.sha1(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{DOMAIN_PREFIX}-{digest}"
    path = Path(folder) / f"{name}.json"
    if not path.exists():
        write_json(path, dict(model_cfg))
    if name not in open_clip.list_models():
        open_clip.add_model_config(path)
    return name


def create_domain_clip(model_cfg: Mapping[str, Any], folder: str | Path, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised domain CLIP from ``model_cfg`` (registered in ``folder``)."""
    name = register_architecture(model_cfg, folder)
    torch.manual_seed(seed)
    with _quiet_open_clip():
        model = open_clip.create_model(name, pretrained=None, pretrained_image=False, pretrained_text=False)
    model.kpnb_arch = name
    model.kpnb_tokenizer = open_clip.get_tokenizer(name)
    return model
