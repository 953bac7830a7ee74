"""The small keypoint estimator that measures pose fidelity (PCK), and PCK itself.

:class:`PoseNet` is a compact heatmap network for 64x64 images (other sizes are resized to its input):
a strided conv encoder down to 1/16 (so the last features see the whole character - telling the
character's left from right needs the face and the body's turn), a decoder back to 1/4 resolution with
skip connections, and

* 17 heatmaps at 1/4 resolution, read out with a soft-argmax (the expected position under the softmax of
  each heatmap), which gives sub-pixel coordinates from a coarse map,
* a visibility head: per joint, OUTSIDE the frame / HIDDEN / VISIBLE (from globally pooled features).

It is trained (:func:`train_estimator`, through :func:`kpnb.train.loop.train`) on ground-truth renders of
:mod:`kpnb.synth` - every joint of a render is exact - with flip augmentation (image and pose together)
and mild blur/noise/colour jitter so that it also reads decoded, slightly blurry generated images.
Loss: L1 on the soft-argmax coordinates of in-frame joints, a cross-entropy pulling each heatmap's softmax
towards a Gaussian at the true joint (keeps the maps unimodal, so soft-argmax does not average a left
and a right candidate), and cross-entropy on visibility.

:func:`pck` implements the definition in ``docs/metrics.md``; :func:`ceiling` is the estimator's own PCK on held-out
ground-truth renders, the number every generated-image PCK is reported against.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from kpnb.core.runtime import Runtime, current
from kpnb.evaluate.pose import ceiling
from kpnb.models.pose_net import CODE_TO_CLASS, VIS_CLASSES, PoseNet, soft_argmax
from kpnb.poses.conditioning import check_poses, flip_batch
from kpnb.poses.pose import HIDDEN, VISIBLE
from kpnb.synth.renders import render_truth
from kpnb.train import checkpoints
from kpnb.train import loop as training

# ======================================================================================================
# Training
# ======================================================================================================
# the keys of a preset's estimator section that training reads (kpnb.core.settings.BASE holds their values)
TRAIN_KEYS = ("steps", "batch_size", "lr", "width", "ckpt_every", "seed")
# fixed parts of the recipe, the same at every preset
RECIPE: dict[str, Any] = {"warmup": 100, "weight_decay": 1e-4, "heatmap_weight": 0.05, "vis_weight": 0.1,
                          "heatmap_sigma": 0.75, "augment": True}
# the order of the settings in a checkpoint's JSON
_SETTINGS_ORDER = ("steps", "batch_size", "lr", "warmup", "weight_decay", "width", "heatmap_weight", "vis_weight",
                   "heatmap_sigma", "augment", "ckpt_every", "seed")


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Photometric jitter so the estimator also reads decoded samples: per image brightness/contrast/colour
    shifts, sometimes a 3x3 blur, a little noise. Geometry is untouched (flip is done with the pose)."""
    B = x.shape[0]
    gain = 1 + 0.15 * (torch.rand(B, 1, 1, 1, generator=g) * 2 - 1)
    shift = 0.1 * (torch.rand(B, 3, 1, 1, generator=g) * 2 - 1)
    x = x * gain + shift
    blur = torch.rand(B, generator=g) < 0.4
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3).to(x), groups=3)
    x = torch.where(blur[:, None, None, None], blurred, x)
    x = x + 0.03 * torch.rand(B, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    return x.clamp(-1, 1)


def estimator_loss(model: PoseNet, x: torch.Tensor, poses: torch.Tensor, heatmap_weight: float = 0.05,
                   vis_weight: float = 0.1, sigma: float = 0.75) -> dict[str, torch.Tensor]:
    """Losses of a batch (see the module docstring); ``sigma`` of the heatmap target in heatmap cells."""
    hm, vl = model(x)
    hm, vl = hm.float(), vl.float()  # the losses in fp32 under autocast
    B, J, h, w = hm.shape
    xy, code = poses[..., :2], poses[..., 2]
    in_frame = ((code == VISIBLE) | (code == HIDDEN)).float()
    n = in_frame.sum().clamp_min(1)
    coord = ((soft_argmax(hm) - xy).abs().sum(-1) * in_frame).sum() / n
    cx = (torch.arange(w, dtype=torch.float32, device=hm.device) + 0.5)
    cy = (torch.arange(h, dtype=torch.float32, device=hm.device) + 0.5)
    d2 = ((cx[None, None, None, :] - xy[..., 0, None, None] * w) ** 2
          + (cy[None, None, :, None] - xy[..., 1, None, None] * h) ** 2)
    target = torch.softmax((-d2 / (2 * sigma ** 2)).flatten(2), -1)
    ce_hm = (-(target * hm.flatten(2).log_softmax(-1)).sum(-1) * in_frame).sum() / n
    cls = torch.full_like(code, -100, dtype=torch.long)
    for c, k in CODE_TO_CLASS.items():
        cls[code == c] = k
    ce_vis = F.cross_entropy(vl.reshape(-1, len(VIS_CLASSES)), cls.reshape(-1), ignore_index=-100)
    total = coord + heatmap_weight * ce_hm + vis_weight * ce_vis
    return {"loss": total, "coord_l1": coord, "heatmap_ce": ce_hm, "vis_ce": ce_vis}


def train_estimator(images: Any, poses: Any, cfg: Mapping[str, Any], ckpt_dir: str | Path, *,
                    progress: bool = True, resume: bool = True,
                    on_log: Callable[[dict[str, float]], None] | None = None,
                    runtime: Runtime | None = None) -> tuple[PoseNet, Any]:
    """Train a PoseNet on uint8 images [N, S, S, 3] with exact poses [N, 17, 3] (e.g. :func:`render_truth`).
    ``cfg``: the preset's ``estimator`` section (the keys of :data:`TRAIN_KEYS`; the rest of the recipe is
    :data:`RECIPE`). The initial weights come from ``seed``. AdamW with
    warm-up + cosine learning rate; random flips (image and pose) and photometric jitter; the randomness of
    step s comes from ``seeded_generator(seed, s)`` and is applied to the global batch in ``batch_fn`` (in the
    runtime's DataLoader workers). Under several ranks BatchNorm statistics are per rank (DDP's default).
    Returns (the model in eval mode, the TrainResult)."""
    rt = runtime or current()
    given = {**RECIPE, **{k: cfg[k] for k in TRAIN_KEYS}}
    c = {k: given[k] for k in _SETTINGS_ORDER}
    poses_t = check_poses(poses, name="estimator poses")
    imgs = np.asarray(images)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] != 3 or imgs.shape[1] != imgs.shape[2]:
        raise ValueError(f"train_estimator: expected square uint8 images [N, S, S, 3], got {imgs.dtype} {imgs.shape}")
    if len(imgs) != len(poses_t):
        raise ValueError(f"train_estimator: {len(imgs)} images but {len(poses_t)} poses")
    torch.manual_seed(int(c["seed"]))  # the same initial weights for the same seed (a resume overwrites them)
    model = PoseNet(image_size=imgs.shape[1], width=int(c["width"])).to(rt.device)
    data = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()  # uint8, converted per batch
    opt = torch.optim.AdamW(model.parameters(), lr=c["lr"], weight_decay=c["weight_decay"], fused=True)
    seed, bs, steps = int(c["seed"]), int(c["batch_size"]), int(c["steps"])
    net = rt.ddp(model, "estimator")

    def batch_fn(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = training.batch_indices(len(data), bs, step, seed=seed)
        x, p = data[idx].float().div(127.5).sub(1.0), poses_t[idx]
        g = training.seeded_generator(seed, step, 2)
        x, p = flip_batch(x, p, torch.rand(len(x), generator=g) < 0.5)
        return (_augment(x, g) if c["augment"] else x), p

    def step_fn(step: int, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, p = batch
        training.set_lr(opt, training.warmup_cosine(step, steps, c["lr"], c["warmup"], final_frac=0.02))
        with rt.autocast():
            losses = estimator_loss(net, x, p, c["heatmap_weight"], c["vis_weight"], c["heatmap_sigma"])
        rt.backward_step(losses["loss"], opt)
        return losses

    config = {"estimator": model.config(), "train": {k: c[k] for k in _SETTINGS_ORDER if k != "steps"},
              "steps": steps, "n_train": len(data)}
    loop = training.LoopSettings(steps=steps, ckpt_dir=ckpt_dir, config=config, batch_size=bs,
                                 ckpt_every=int(c["ckpt_every"]), seed=seed, desc="estimator", resume=resume,
                                 progress=progress)
    result = training.train({"model": model}, {"opt": opt}, step_fn, batch_fn, loop, on_log=on_log, runtime=rt)
    return model.eval(), result


def load_estimator(ckpt_dir: str | Path) -> PoseNet:
    """The PoseNet of a :func:`train_estimator` checkpoint folder (or file), in eval mode."""
    return checkpoints.load_trained(ckpt_dir, "estimator", lambda c: PoseNet(**c), what="kpnb pose-estimator")


def fit_estimator(cfg: Mapping[str, Any], ckpt_dir: str | Path, *, render_size: int = 256, progress: bool = True,
                  resume: bool = True, runtime: Runtime | None = None) -> tuple[PoseNet, dict[str, Any]]:
    """The whole estimator stage from a preset's ``estimator`` section: render ``n_train`` ground-truth
    characters (``train_seed``; a share ``partial`` of them partial figures) at ``image_size``, train, and
    measure the ceiling on ``n_val`` held-out whole-figure renders (``val_seed``). Returns (model, info) with
    info = ceiling PCK keys (prefixed ``ceiling.``), ``train_seconds``, ``render_seconds``, ``images_per_s``,
    ``steps``, ``n_train``."""
    t0 = time.perf_counter()
    size = int(cfg["image_size"])
    imgs, poses = render_truth(int(cfg["n_train"]), int(cfg["train_seed"]), size, render_size,
                               partial=float(cfg["partial"]))
    vimgs, vposes = render_truth(int(cfg["n_val"]), int(cfg["val_seed"]), size, render_size)
    render_s = time.perf_counter() - t0
    model, res = train_estimator(imgs, poses, cfg, ckpt_dir, progress=progress, resume=resume, runtime=runtime)
    info: dict[str, Any] = {f"ceiling.{k}": v for k, v in ceiling(model, vimgs, vposes).items()}
    info.update(train_seconds=res.seconds, render_seconds=render_s, images_per_s=res.images_per_s, steps=res.step,
                n_train=len(imgs))
    return model, info


def fit_keeper(cfg: Mapping[str, Any], keeper_seed: int, ckpt_dir: str | Path, *, steps: int | None = None,
               n_train: int | None = None, render_size: int = 256, progress: bool = True
               ) -> tuple[PoseNet, dict[str, Any]]:
    """A second estimator, trained apart from the judge (the estimator of ``cfg``): :func:`fit_estimator` with
    ``keeper_seed`` for both its training renders and its initialisation, and its own budget ``steps`` /
    ``n_train`` (None: the judge's); the ceiling is measured on the judge's held-out renders. A seed equal to
    the judge's ``train_seed`` or ``val_seed`` is refused: the keeper would see the judge's renders."""
    if keeper_seed in (cfg["train_seed"], cfg["val_seed"]):
        raise ValueError(f"clip.keeper_seed {keeper_seed} must differ from estimator.train_seed and val_seed "
                         f"({cfg['train_seed']}, {cfg['val_seed']}): the keeper has to be trained "
                         "apart from the judge")
    budget = {k: int(v) for k, v in (("steps", steps), ("n_train", n_train)) if v is not None}
    return fit_estimator({**cfg, **budget, "train_seed": keeper_seed, "seed": keeper_seed}, ckpt_dir,
                         render_size=render_size, progress=progress)
