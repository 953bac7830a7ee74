"""CLIP-guided tuning: move an image's VQ latent towards a text prompt (VQGAN-CLIP, Crowson et al. 2022).

One step of :func:`tune`::

    z  --quantize (straight-through)-->  zq  --decode-->  image  --clamp (gradient kept)-->  x in [0, 1]
    loss = clip_prompt_loss(x)                     CLIP on random cutouts: spherical distance to the prompt
         + anchor_weight * anchor_loss(z, z_start) stay near the starting latent
         + extra_loss(x)                           optional, e.g. keeper_loss: hold the pose
    Adam step on z where the mask is 1, then z is clamped into the codebook's per-channel range

Only the latent moves; the VQ decoder and CLIP get no gradient. Two choices a reader must know:

* which latent cells may change is a binary mask (:func:`region_mask`: only the head, all but the body, or
  everything); the pose comes from the conditioning, so where the figure is, is known;
* tuning raises a CLIP score, so CLIP cannot judge it: :func:`measure` asks an attribute classifier
  (:mod:`kpnb.models.attributes`) whether the hair turned red and the pose estimator of notebook 04 whether the pose
  held. The pose term (:func:`keeper_loss`) goes through a second, separately trained estimator, never the judge.

Notebook 06 tunes each spec's samples with :func:`tune_samples` (settings: :class:`TuneSettings` from the
preset's ``clip`` section) and reports :func:`tuning_metrics`. ``docs/metrics.md`` defines the reported
numbers; ``docs/experiments.md`` holds the measured settings sweeps.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from kpnb.core import progress as kprogress
from kpnb.core.images import to_model
from kpnb.evaluate.edits import saturation
from kpnb.evaluate.pose import pck
from kpnb.evaluate.vq import reconstruct
from kpnb.models.attributes import attribute_probs
from kpnb.models.clip import (
    encode_image_tensor,
    encode_texts,
    hair_prompt,
    make_cutouts,
    preprocess_cfg,
    tensor_to_images,
)
from kpnb.models.pose_net import predict, soft_argmax
from kpnb.poses.conditioning import SKELETON_CHANNELS, check_poses, skeleton_maps
from kpnb.poses.pose import JOINT_GROUPS, LIMBS, N_JOINTS, VISIBLE

MASK_KINDS = ("head", "body", "none")


# ---- settings -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TuneSettings:
    """How :func:`tune` optimises: Adam on the latent for ``steps`` with step ``lr`` (in latent units; the
    codebook's spread sets the scale), ``cutouts`` crops per image per step (each a random ``cut_min_frac``..1
    of the side, mirrored at random, Gaussian noise up to ``cut_noise``; drawn from ``seed``), and
    ``anchor_weight`` x :func:`anchor_loss`. History rows carry the images every ``record_every`` steps;
    ``progress`` shows a progress bar."""

    steps: int = 100
    lr: float = 0.1
    cutouts: int = 32
    cut_min_frac: float = 0.75
    cut_noise: float = 0.05
    anchor_weight: float = 0.0
    seed: int = 0
    record_every: int = 10
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], mask: str = "none") -> "TuneSettings":
        """The settings of a preset's ``clip`` section, with the anchor that goes with a ``mask`` kind:
        ``clip.head_anchor`` for ``"head"``, none for ``"body"`` (the frozen body holds the figure),
        ``clip.anchor_weight`` for ``"none"``."""
        anchors = {"head": cfg["head_anchor"], "body": 0.0, "none": cfg["anchor_weight"]}
        if mask not in anchors:
            raise ValueError(f"unknown mask kind {mask!r}; valid: {', '.join(MASK_KINDS)}")
        return cls(steps=cfg["tune_steps"], lr=cfg["tune_lr"], cutouts=cfg["cutouts"],
                   cut_min_frac=cfg["cut_min_frac"], cut_noise=cfg["cut_noise"], anchor_weight=anchors[mask],
                   seed=cfg["seed"])


@dataclass
class TuneResult:
    image: np.ndarray                 # uint8 [N, H, W, 3]: the decoded tuned latent
    latent: torch.Tensor              # [N, C, h, w]: the tuned latent, quantised
    start_image: np.ndarray           # uint8 [N, H, W, 3]: the decoded starting latent (what tuning began at)
    clip_score_before: np.ndarray     # [N]: 100 x cosine(full image, prompt) at the start
    clip_score_after: np.ndarray      # [N]
    history: list[dict[str, Any]] = field(default_factory=list)  # per step; images, clip scores every record_every
    seconds: float = 0.0
    iterations_per_s: float = 0.0


# ---- pieces of a step -----------------------------------------------------------------------------------
def spherical_dist_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared great-circle distance / 2 between directions: ``2 * arcsin(|x^ - y^| / 2)^2`` = theta^2 / 2
    for the angle theta between x and y (0 for the same direction, pi^2/8 orthogonal, pi^2/2 opposite).
    Unlike 1 - cosine its gradient does not vanish as the angle approaches pi. Over the last dim."""
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).div(2).clamp(max=1.0).arcsin().pow(2).mul(2)


class _ClampWithGrad(torch.autograd.Function):
    """Clamp in the forward pass; in the backward pass let the gradient through unless it would push an
    already out-of-range value further out (VQGAN-CLIP's ClampWithGrad). A plain clamp would zero the
    gradient of every saturated pixel, and tuning could never pull a blown-out pixel back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.lo, ctx.hi = lo, hi
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        outside = x - x.clamp(ctx.lo, ctx.hi)
        return grad * (outside * grad >= 0), None, None


def clamp_with_grad(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return _ClampWithGrad.apply(x, lo, hi)


def codebook_range(vq: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max of the codebook, ``[1, C, 1, 1]`` each: the box the latent is kept in, so
    that it never drifts where no code lives (there the straight-through gradient means nothing)."""
    lo, hi = vq.quantizer.channel_range()
    return lo.view(1, -1, 1, 1), hi.view(1, -1, 1, 1)


def decode_latent(vq: torch.nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantised latent (straight-through), image in [0, 1] with a gradient-keeping clamp)."""
    zq = vq.quantize(z)[0]
    return zq, clamp_with_grad(vq.decode(zq).add(1).div(2), 0.0, 1.0)


def clip_prompt_loss(clip_model: torch.nn.Module, x01: torch.Tensor, target: torch.Tensor,
                     settings: TuneSettings, generator: torch.Generator) -> torch.Tensor:
    """The prompt term: the spherical distance between CLIP's embeddings of ``settings.cutouts`` random
    crops of each image ``[N, 3, H, W]`` and its prompt embedding (``target`` ``[N, D]``), averaged over the
    crops and summed over the images. Crops, not the whole image, so that no single adversarial pattern
    satisfies CLIP at one scale and position."""
    n, k = len(x01), settings.cutouts
    cuts = make_cutouts(x01, k, preprocess_cfg(clip_model)["size"], min_frac=settings.cut_min_frac,
                        noise=settings.cut_noise, generator=generator)
    emb = encode_image_tensor(clip_model, cuts)  # [k * N, D], cutout-major
    return spherical_dist_loss(emb, target.repeat(k, 1)).view(k, n).mean(0).sum()


def anchor_loss(z: torch.Tensor, z_start: torch.Tensor) -> torch.Tensor:
    """The pull towards the start: each latent's mean squared distance to its starting latent, summed."""
    return (z - z_start).pow(2).flatten(1).mean(1).sum()


def pose_keeping_loss(estimator: torch.nn.Module, poses: np.ndarray | torch.Tensor,
                      weight: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """An ``extra_loss`` for :func:`tune` that keeps the pose: ``weight`` x the mean L1 distance (in frame
    units) between the pose estimator's soft-argmax joints on the decoded images and ``poses``
    (``[N, 17, 3]`` Pose arrays), over the joints that are VISIBLE in ``poses``.

    PCK measured afterwards with the same estimator is then no longer independent of the tuning (the
    optimiser can please this estimator without drawing a better pose): :func:`keeper_loss` uses a second one."""
    target = torch.as_tensor(np.asarray(poses), dtype=torch.float32)
    if target.ndim != 3 or target.shape[1:] != (17, 3):
        raise ValueError(f"poses must be [N, 17, 3], got {tuple(target.shape)}")
    mask = (target[..., 2] == VISIBLE).float()
    estimator.eval()

    def loss(x01: torch.Tensor) -> torch.Tensor:
        x = x01 * 2 - 1
        size = estimator.image_size
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        xy = soft_argmax(estimator(x)[0].float())
        t, m = target.to(xy.device), mask.to(xy.device)
        err = (xy - t[..., :2]).abs().sum(-1)
        return weight * (err * m).sum() / m.sum().clamp_min(1)

    return loss


def keeper_loss(keeper: torch.nn.Module, images: np.ndarray, poses: np.ndarray | torch.Tensor,
                weight: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pose term notebook 06 tunes with: :func:`pose_keeping_loss` through a *second* pose estimator
    (the "keeper", trained apart from the one that judges PCK: other renders, other seed), towards the joints
    the keeper finds on the starting ``images`` (uint8 ``[N, H, W, 3]``), on the joints VISIBLE in the
    conditioning ``poses``. Holding what the keeper saw, rather than the conditioning pose, asks tuning to
    keep the pose, not to redraw it."""
    target = predict(keeper, images)
    target[..., 2] = np.asarray(poses)[..., 2]
    return pose_keeping_loss(keeper, target, weight)


# ---- the loop -------------------------------------------------------------------------------------------
def _start_latent(vq: torch.nn.Module, image_or_latent: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images ``[H, W, 3]`` / ``[N, H, W, 3]`` are encoded; a tensor ``[N, C, h, w]`` is taken as a
    latent (pre-quantisation, e.g. a diffusion sample)."""
    if isinstance(image_or_latent, torch.Tensor):
        if image_or_latent.ndim != 4:
            raise ValueError(f"a latent must be [N, C, h, w], got shape {tuple(image_or_latent.shape)}")
        return image_or_latent.detach().float().clone().to(next(vq.parameters()).device)
    arr = np.asarray(image_or_latent)
    if arr.dtype != np.uint8 or arr.shape[-1] != 3 or arr.ndim not in (3, 4):
        raise ValueError(f"image_or_latent: expected uint8 images [N, H, W, 3] or a latent tensor "
                         f"[N, C, h, w], got {type(image_or_latent).__name__} {arr.dtype} {arr.shape}")
    with torch.no_grad():
        return vq.encode(to_model(arr.reshape(-1, *arr.shape[-3:])).to(next(vq.parameters()).device))


def _binary_mask(mask: torch.Tensor | None, z0: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    mask = torch.as_tensor(mask, dtype=torch.float32, device=z0.device)
    if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, len(z0)) or mask.shape[2:] != z0.shape[2:]:
        raise ValueError(f"mask must be [N or 1, 1, {z0.shape[2]}, {z0.shape[3]}] for these latents, "
                         f"got {tuple(mask.shape)}")
    return (mask > 0.5).float()


def _clip_scores(clip_model: torch.nn.Module, x01: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """100 x cosine of each whole image with its prompt."""
    with torch.no_grad():
        return (100.0 * (encode_image_tensor(clip_model, x01) * target).sum(-1)).float().cpu().numpy()


def tune(vq: torch.nn.Module, clip_model: torch.nn.Module, image_or_latent: np.ndarray | torch.Tensor,
         prompt: str | Sequence[str], settings: TuneSettings | None = None, *, mask: torch.Tensor | None = None,
         extra_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
         callback: Callable[[int, np.ndarray, dict[str, Any]], None] | None = None,
         **overrides: Any) -> TuneResult:
    """Tune images towards ``prompt`` (one for all, or one per image) by optimising their VQ latent.

    ``image_or_latent``: uint8 images ``[N, H, W, 3]`` (or one ``[H, W, 3]``), or a latent tensor
    ``[N, C, h, w]`` from ``vq.encode`` or a diffusion sample. ``settings`` (default :class:`TuneSettings`),
    with any of its fields overridden by keyword (``steps=5``, ``progress=False``). ``mask``:
    ``[N or 1, 1, h, w]`` at latent resolution, 1 where the latent may change and 0 where it stays (e.g.
    :func:`region_mask`); binary, since Adam's per-element scaling would undo a soft weight. ``extra_loss``:
    called with the decoded images ``[N, 3, H, W]`` in [0, 1] (differentiable), returns a scalar to add, its
    weight included (e.g. :func:`keeper_loss`). ``callback(step, images_uint8, row)`` runs every
    ``record_every`` steps and at the end. Both models are put in eval mode; their weights are not changed.
    """
    s = dataclasses.replace(settings or TuneSettings(), **overrides)
    if s.steps < 0:
        raise ValueError("steps must be >= 0")
    vq.eval()
    clip_model.eval()
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    z0 = _start_latent(vq, image_or_latent)
    n = len(z0)
    if len(prompts) not in (1, n):
        raise ValueError(f"{n} images but {len(prompts)} prompts (give one, or one per image)")
    target = encode_texts(clip_model, prompts)
    target = target.expand(n, -1) if len(target) == 1 else target  # [N, D]
    mask = _binary_mask(mask, z0)
    lo, hi = codebook_range(vq)
    gen = torch.Generator().manual_seed(s.seed)
    z = z0.clamp(lo, hi).clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=s.lr)
    with torch.no_grad():
        _, x_start = decode_latent(vq, z)
    before = _clip_scores(clip_model, x_start, target)
    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = kprogress.bar(range(s.steps + 1), desc=f"CLIP tuning: {prompts[0][:40]}", disable=not s.progress)
    for step in bar:
        _, x = decode_latent(vq, z)
        clip_loss, anchor = clip_prompt_loss(clip_model, x, target, s, gen), anchor_loss(z, z0)
        loss = clip_loss + s.anchor_weight * anchor
        extra = extra_loss(x) if extra_loss is not None else None
        if extra is not None:
            loss = loss + extra
        row: dict[str, Any] = {"step": step, "loss": loss.item() / n, "clip_loss": clip_loss.item() / n,
                               "anchor": anchor.item() / n}
        if extra is not None:
            row["extra"] = extra.item()
        if step % s.record_every == 0 or step == s.steps:
            # the whole-image score costs a CLIP pass of its own: taken only with the recorded images
            scores = _clip_scores(clip_model, x.detach(), target)
            row.update(clip_score=float(scores.mean()), clip_scores=scores.tolist(), images=tensor_to_images(x))
            if callback is not None:
                callback(step, row["images"], row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", clip=f"{row['clip_score']:.2f}", refresh=False)
        history.append(row)
        if step == s.steps:  # the last row describes the final latent; no step after it (and the bar counts it)
            continue
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"CLIP tuning: loss is {row['loss']} at step {step}; lower lr ({s.lr})")
        (grad,) = torch.autograd.grad(loss, [z])  # only the latent gets a gradient, never the models
        opt.zero_grad(set_to_none=True)
        z.grad = grad if mask is None else grad * mask  # Adam never moves an element whose gradient stays 0
        opt.step()
        with torch.no_grad():
            z.copy_(torch.maximum(torch.minimum(z, hi), lo))
    bar.close()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        zq, x = decode_latent(vq, z)
    return TuneResult(image=tensor_to_images(x), latent=zq.detach(), start_image=tensor_to_images(x_start),
                      clip_score_before=before, clip_score_after=_clip_scores(clip_model, x, target),
                      history=history, seconds=seconds, iterations_per_s=s.steps / max(seconds, 1e-9))


# ---- latent masks ---------------------------------------------------------------------------------------
def pose_region_mask(poses: np.ndarray | torch.Tensor, latent_size: int, radius: float = 1.5) -> torch.Tensor:
    """A :func:`tune` ``mask`` that freezes the body: 0 on latent cells within ``radius`` cells of an arm,
    leg or torso segment or joint of ``poses`` (``[N, 17, 3]``; missing joints draw nothing), 1 elsewhere
    (head, hair, background may change). The pose is then kept by construction, not by a loss that the
    same estimator which measures PCK would judge."""
    maps = skeleton_maps(check_poses(poses), latent_size, sigma=1.0)  # [N, 17 + 16, s, s], 1 on a visible part
    assert maps.shape[1] == SKELETON_CHANNELS
    head = set(JOINT_GROUPS["head"])
    body = [j for j in range(N_JOINTS) if j not in head]
    body += [N_JOINTS + k for k, (a, b) in enumerate(LIMBS) if a not in head and b not in head]
    # exp(-d^2/2) >= 0.5 * exp(-radius^2/2): within radius of a hidden part (amplitude 0.5), radius + ~0.4 of a visible one
    near = maps[:, body].amax(1, keepdim=True) >= 0.5 * math.exp(-radius ** 2 / 2)
    return (~near).float()


def head_region_mask(poses: np.ndarray | torch.Tensor, latent_size: int, radius: float = 3.0) -> torch.Tensor:
    """A :func:`tune` ``mask`` that frees only the head: 1 on latent cells within ``radius`` cells of a head
    joint (nose, eyes, ears) of ``poses`` (``[N, 17, 3]``), 0 elsewhere - for prompts about the hair or
    face, so that tuning can neither redraw the body nor paint new figures into the background."""
    maps = skeleton_maps(check_poses(poses), latent_size, sigma=1.0)[:, JOINT_GROUPS["head"]]
    return (maps.amax(1, keepdim=True) >= 0.5 * math.exp(-radius ** 2 / 2)).float()


def region_mask(kind: str, poses: np.ndarray | torch.Tensor, latent_size: int,
                head_radius: float = 0.125) -> torch.Tensor | None:
    """The :func:`tune` mask of a kind: ``"head"`` (:func:`head_region_mask`, ``head_radius`` a fraction of
    the image side, so f4, f8 and f16 free the same area), ``"body"`` (:func:`pose_region_mask`: the body
    frozen) or ``"none"`` (None: everything may change)."""
    if kind == "head":
        return head_region_mask(poses, latent_size, radius=head_radius * latent_size)
    if kind == "body":
        return pose_region_mask(poses, latent_size)
    if kind == "none":
        return None
    raise ValueError(f"unknown mask kind {kind!r}; valid: {', '.join(MASK_KINDS)}")


# ---- notebook 06: tuning generated samples, judging, reporting -------------------------------------------
def tuning_prompts(hair_colour: str, extra_prompts: Sequence[str] = ()) -> dict[str, str]:
    """The prompts notebook 06 tunes towards, by the key its metrics use: ``"<colour>_hair"`` (the attribute
    prompt, :func:`kpnb.models.clip.hair_prompt`; first) and each extra prompt with its spaces as underscores."""
    prompts = {f"{hair_colour}_hair": hair_prompt(hair_colour)}
    prompts.update({p.replace(" ", "_"): p for p in extra_prompts})
    return prompts


def tune_samples(vq: torch.nn.Module, clip_model: torch.nn.Module, images: np.ndarray, poses: np.ndarray,
                 prompt: str, cfg: Mapping[str, Any], mask_kind: str = "none", *,
                 keeper: torch.nn.Module | None = None, recon: np.ndarray | None = None,
                 progress: bool = True) -> TuneResult:
    """Tune generated ``images`` (uint8 ``[N, H, W, 3]``, drawn for ``poses``) towards ``prompt`` with the
    settings of a preset's ``clip`` section ``cfg``: start at the images' own VQ latents, let the cells of
    ``mask_kind`` change (:func:`region_mask` with ``clip.head_radius``) with that kind's anchor
    (:meth:`TuneSettings.from_config`) and, given a ``keeper``, hold the joints it finds on the
    reconstructions ``recon`` (``vq.reconstruct`` of the images, computed when not given) with
    :func:`keeper_loss`, weight ``clip.pose_weight``."""
    with torch.no_grad():
        z0 = vq.encode(to_model(images))
    mask = region_mask(mask_kind, poses, z0.shape[-1], head_radius=cfg["head_radius"])
    extra = None
    if keeper is not None:
        recon = reconstruct(vq, images)[0] if recon is None else recon
        extra = keeper_loss(keeper, recon, poses, cfg["pose_weight"])
    return tune(vq, clip_model, z0, prompt, TuneSettings.from_config(cfg, mask_kind), mask=mask,
                extra_loss=extra, progress=progress)


def measure(images: np.ndarray, poses: np.ndarray, estimator: torch.nn.Module,
            attr_model: torch.nn.Module | None = None, attribute: tuple[str, str] | None = None,
            keeper: torch.nn.Module | None = None, *, draws: int = 1) -> dict[str, Any]:
    """What tuning is judged by, on uint8 images ``[N, H, W, 3]`` generated for ``poses`` ``[N, 17, 3]``:
    ``pck@0.1`` (and 0.05, 0.2) of ``estimator`` against the poses, ``saturation``, and with ``attribute``
    = (name, class), e.g. ("hair_colour", "red"), the share of images ``attr_model`` puts in that class
    (``rate``) and its mean probability (``prob``). With a ``keeper``, also its ``keeper_pck@0.1``: what the
    pose term optimised, reported beside the judge's. With ``draws`` > 1, also ``rate.draws`` and
    ``pck@0.1.draws``: the same numbers on ``draws`` equal consecutive parts of the images (independent draws
    of samples), whose spread shows how far a number moves from one draw to the next."""
    out = _judged(images, poses, estimator, attr_model, attribute)
    if keeper is not None:
        out["keeper_pck@0.1"] = pck(predict(keeper, images), poses)["pck@0.1"]
    if draws > 1:
        if len(images) < draws:
            raise ValueError(f"measure: {len(images)} images cannot make {draws} draws")
        parts = [_judged(images[i], poses[i], estimator, attr_model, attribute)
                 for i in np.array_split(np.arange(len(images)), draws)]
        out.update({f"{k}.draws": [p[k] for p in parts] for k in ("rate", "pck@0.1") if k in out})
    return out


def _judged(images: np.ndarray, poses: np.ndarray, estimator: torch.nn.Module, attr_model: torch.nn.Module | None,
            attribute: tuple[str, str] | None) -> dict[str, Any]:
    """:func:`measure`'s PCK, saturation and attribute rate of one set of images."""
    out: dict[str, Any] = {k: v for k, v in pck(predict(estimator, images), poses).items() if k.startswith("pck@")}
    out["saturation"] = float(saturation(images).mean())
    if attribute is not None:
        if attr_model is None:
            raise ValueError("an attribute rate needs attr_model")
        name, cls = attribute
        if name not in attr_model.classes or cls not in attr_model.classes[name]:
            raise ValueError(f"attribute {name}={cls!r} is not one the classifier knows: {attr_model.classes}")
        p = attribute_probs(attr_model, images)[name]
        k = attr_model.classes[name].index(cls)
        out["rate"] = float((p.argmax(-1) == k).mean())
        out["prob"] = float(p[:, k].mean())
    return out


def pick_best_spec(before: Mapping[str, Mapping[str, float]], after: Mapping[tuple[str, str], Mapping[str, float]],
                   key: str) -> str:
    """The spec whose tuning towards prompt ``key`` did best: its attribute rate after, less 10 x the share
    of its PCK@0.1 drop beyond 0.1 (the target is a rate of at least 0.8 with a drop of at most 0.1).
    ``before[spec]`` and ``after[spec, key]`` are :func:`measure` results; ties go to the first spec."""
    def score(spec: str) -> float:
        return after[spec, key]["rate"] - 10 * max(0.0, before[spec]["pck@0.1"] - after[spec, key]["pck@0.1"] - 0.1)

    return max(before, key=score)


def tuning_metrics(base: Mapping[str, float], before: Mapping[str, Mapping[str, Any]],
                   results: Mapping[tuple[str, str], TuneResult],
                   after: Mapping[tuple[str, str], Mapping[str, Any]], best_spec: str | None = None,
                   ablations: Mapping[str, Mapping[str, Any]] | None = None,
                   edits: Mapping[tuple[str, str], Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Notebook 06's tuning numbers as flat metric keys (``docs/metrics.md``): ``samples.<m>`` for the
    untuned samples (``base``); per spec and prompt key ``<spec>.<key>.clip_score_before/_after``,
    ``.<m>_before/_after`` for m in rate, pck@0.1, saturation (before: the spec's reconstruction),
    ``.pck@0.1_drop``, ``.iterations_per_s``, ``.keeper_pck@0.1_before/_after`` when measured with a keeper, and
    per draw (:func:`measure`'s ``draws``) ``.rate_after_draws`` and ``.pck@0.1_drop_draws``; ``edits[spec, key]``
    (:func:`kpnb.evaluate.edits.describe_edit`) under ``<spec>.<key>.edit.``; and for each ablation mask kind
    ``ablation.<best_spec>.<kind>.rate_after``, ``.pck@0.1_after`` and ``.pck@0.1_drop``."""
    out: dict[str, Any] = {f"samples.{k}": base[k] for k in ("pck@0.1", "rate", "saturation")}
    for (s, key), r in results.items():
        p, a = f"{s}.{key}", after[s, key]
        out[f"{p}.clip_score_before"] = float(r.clip_score_before.mean())
        out[f"{p}.clip_score_after"] = float(r.clip_score_after.mean())
        for m in ("rate", "pck@0.1", "saturation"):
            out[f"{p}.{m}_before"] = before[s][m]
            out[f"{p}.{m}_after"] = a[m]
        out.update(_drops(p, before[s], a))
        out[f"{p}.iterations_per_s"] = r.iterations_per_s
        if "keeper_pck@0.1" in a:
            out[f"{p}.keeper_pck@0.1_before"] = before[s]["keeper_pck@0.1"]
            out[f"{p}.keeper_pck@0.1_after"] = a["keeper_pck@0.1"]
        out.update({f"{p}.edit.{k}": v for k, v in (edits or {}).get((s, key), {}).items()})
    for kind, m in (ablations or {}).items():
        out[f"ablation.{best_spec}.{kind}.rate_after"] = m["rate"]
        out[f"ablation.{best_spec}.{kind}.pck@0.1_after"] = m["pck@0.1"]
        if best_spec in before:
            out.update(_drops(f"ablation.{best_spec}.{kind}", before[best_spec], m))
    return out


def _drops(prefix: str, before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """PCK@0.1 before less after, and per draw with the rate after when :func:`measure` made draws."""
    out: dict[str, Any] = {f"{prefix}.pck@0.1_drop": before["pck@0.1"] - after["pck@0.1"]}
    if "pck@0.1.draws" in after and "pck@0.1.draws" in before:
        out[f"{prefix}.pck@0.1_drop_draws"] = [b - a for b, a in zip(before["pck@0.1.draws"], after["pck@0.1.draws"])]
    if "rate.draws" in after:
        out[f"{prefix}.rate_after_draws"] = list(after["rate.draws"])
    return out
