"""The small keypoint estimator that measures pose fidelity (PCK), and PCK itself.

:class:`PoseNet` is a compact heatmap network for 64x64 images (other sizes are resized to its input):
a strided conv encoder down to 1/16 (so the last features see the whole character - telling the
character's left from right needs the face and the body's turn), a decoder back to 1/4 resolution with
skip connections, and

* 17 heatmaps at 1/4 resolution, read out with a soft-argmax (the expected position under the softmax of
  each heatmap), which gives sub-pixel coordinates from a coarse map,
* a visibility head: per joint, OUTSIDE the frame / HIDDEN / VISIBLE (from globally pooled features).

It is trained (:func:`train_estimator`, through :func:`kpnb.training.train`) on ground-truth renders of
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
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image
import torch
import torch.nn.functional as F
from torch import nn

from . import synth, training
from .runtime import Runtime, current
from .conditioning import check_poses, flip_batch, mask_joints
from .images import to_model
from .keypoints import HIDDEN, JOINT_GROUPS, JOINTS, MISSING, N_JOINTS, OUTSIDE, VIEWS, VISIBLE, Pose

# visibility classes of the estimator's head -> kpnb visibility codes
VIS_CLASSES = (OUTSIDE, HIDDEN, VISIBLE)
_CODE_TO_CLASS = {OUTSIDE: 0, HIDDEN: 1, VISIBLE: 2}


# ======================================================================================================
# PCK (docs/metrics.md)
# ======================================================================================================
def pck(pred: Any, target: Any, alphas: Sequence[float] = (0.05, 0.1, 0.2)) -> dict[str, float]:
    """Percentage of correct keypoints, as ``docs/metrics.md`` defines it.

    ``pred``: [N, 17, 2] predicted (x, y), or [N, 17, 3] with a visibility code - then a joint predicted
    OUTSIDE or MISSING counts as not found. ``target``: the conditioning poses [N, 17, 3] (Pose arrays).
    A joint counts only when it is in the frame and VISIBLE in the target; it is correct when its predicted
    position lies within ``a * max(w, h)`` of the target, w and h being the bounding box of the target's
    in-frame (visible or hidden) joints. Mean over the counted joints of an image, then over images
    (images without a counted joint are left out). Returns ``pck@<a>`` and ``pck@<a>.<group>`` for the
    groups of :data:`kpnb.keypoints.JOINT_GROUPS` (the same two-level mean within the group), plus
    ``n_images`` and ``n_joints`` (counted)."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(check_poses(target, name="pck target"), dtype=np.float64)
    if pred.ndim != 3 or pred.shape[0] != target.shape[0] or pred.shape[1] != N_JOINTS or pred.shape[2] not in (2, 3):
        raise ValueError(f"pck: pred must be [N, 17, 2 or 3] with N = {target.shape[0]}, got {list(pred.shape)}")
    vis = target[..., 2]
    counted = vis == VISIBLE
    in_frame = (vis == VISIBLE) | (vis == HIDDEN)
    txy = target[..., :2]
    lo = np.where(in_frame[..., None], txy, np.inf).min(1)
    hi = np.where(in_frame[..., None], txy, -np.inf).max(1)
    size = np.where(in_frame.any(1), (hi - lo).max(-1), 0.0)  # max(w, h) of the in-frame joints' bbox
    dist = np.linalg.norm(pred[..., :2] - txy, axis=-1)       # [N, 17]
    found = np.ones_like(counted) if pred.shape[2] == 2 else ~np.isin(np.rint(pred[..., 2]), (OUTSIDE, MISSING))
    dist = np.where(found & np.isfinite(dist), dist, np.inf)
    out: dict[str, float] = {}
    groups = {"": list(range(N_JOINTS)), **JOINT_GROUPS}
    for a in alphas:
        correct = dist <= a * size[:, None]
        for g, idx in groups.items():
            c, m = correct[:, idx], counted[:, idx]
            n = m.sum(1)
            keep = n > 0
            per_image = (c & m).sum(1)[keep] / n[keep]
            key = f"pck@{a:g}" + (f".{g}" if g else "")
            out[key] = float(per_image.mean()) if keep.any() else float("nan")
    out["n_images"] = int((counted.sum(1) > 0).sum())
    out["n_joints"] = int(counted.sum())
    return out


# ======================================================================================================
# COCO keypoint AP (docs/metrics.md)
# ======================================================================================================
AP_FRAME = 256  # pixels of the square frame the poses are placed in for COCOeval (OKS is scale-free)


def pck_by_view(pred: Any, target: Any, views: Any, alpha: float = 0.1) -> dict[str, float]:
    """:func:`pck` at ``alpha`` within each group of ``views`` (one label per pose, e.g.
    :func:`kpnb.keypoints.pose_views` of the conditioning poses): ``<view>.pck@<alpha>`` and ``<view>.n`` (poses)
    for each view present, in :data:`kpnb.keypoints.VIEWS` order."""
    pred, target, views = np.asarray(pred), np.asarray(target), np.asarray(views)
    if len(views) != len(target) or len(pred) != len(target):
        raise ValueError(f"pck_by_view: {len(pred)} predictions, {len(target)} poses and {len(views)} views")
    out: dict[str, float] = {}
    for v in VIEWS:
        sel = views == v
        if sel.any():
            out[f"{v}.pck@{alpha}"] = pck(pred[sel], target[sel], (alpha,))[f"pck@{alpha}"]
            out[f"{v}.n"] = int(sel.sum())
    return out


def pose_ap(pred: Any, target: Any, scores: Any = None) -> dict[str, float]:
    """COCO keypoint AP (object keypoint similarity) with ``pycocotools``' COCOeval, as pose-conditioned
    generation papers report it: one image per conditioning pose, the estimator's pose of it as the one
    detection (``scores`` its confidence, :func:`predict` ``with_scores=True``; None scores every detection
    1, so AP then ranks by nothing), the conditioning pose as the ground truth.

    Ground truth: joints VISIBLE -> COCO v=2, HIDDEN -> v=1 (labelled but occluded, counted by OKS as COCO
    does), OUTSIDE/MISSING -> v=0 (not counted); the box and area are those of the pose's in-frame joints
    (the pose's bbox, w x h, in a :data:`AP_FRAME`-pixel frame), so OKS is stricter than COCO's, whose
    area is the person's segmentation. The 17 COCO sigmas (kpnb's joint order is COCO's).
    Returns ``ap`` (mean over OKS 0.50:0.05:0.95), ``ap@0.5``, ``ap@0.75``, ``ar``, ``oks`` (mean OKS of
    the detections against their own pose) and ``n_images`` (poses with a labelled joint)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    target = np.asarray(check_poses(target, name="pose_ap target"), dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    n = target.shape[0]
    if pred.ndim != 3 or pred.shape[0] != n or pred.shape[1] != N_JOINTS or pred.shape[2] not in (2, 3):
        raise ValueError(f"pose_ap: pred must be [N, 17, 2 or 3] with N = {n}, got {list(pred.shape)}")
    scores = np.ones(n) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.shape[0] != n or not np.isfinite(scores).all():
        raise ValueError(f"pose_ap: scores must be {n} finite numbers, got shape {list(scores.shape)}")
    vis = target[..., 2]
    v = np.where(vis == VISIBLE, 2, np.where(vis == HIDDEN, 1, 0))
    txy = target[..., :2] * AP_FRAME
    images, gts, dts = [], [], []
    for i in range(n):
        lab = v[i] > 0
        if lab.any():
            (x0, y0), (x1, y1) = txy[i][lab].min(0), txy[i][lab].max(0)
        else:
            x0 = y0 = x1 = y1 = 0.0
        kps = np.stack([np.where(lab, txy[i, :, 0], 0), np.where(lab, txy[i, :, 1], 0), v[i]], 1)
        images.append({"id": i + 1, "width": AP_FRAME, "height": AP_FRAME})
        # ids from 1: COCOeval takes a matched id of 0 for "unmatched"
        gts.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                    "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float((x1 - x0) * (y1 - y0)),
                    "keypoints": kps.reshape(-1).tolist(), "num_keypoints": int(lab.sum())})
        dkp = np.concatenate([pred[i, :, :2] * AP_FRAME, np.ones((N_JOINTS, 1))], 1)
        dts.append({"image_id": i + 1, "category_id": 1, "keypoints": dkp.reshape(-1).tolist(),
                    "score": float(scores[i])})
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gts,
                      "categories": [{"id": 1, "name": "person", "keypoints": list(JOINTS)}]}
        gt.createIndex()
        dt = gt.loadRes(dts) if dts else COCO()
        ev = COCOeval(gt, dt, iouType="keypoints")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    oks = [float(np.max(o)) for o in ev.ious.values() if len(o)]
    st = ev.stats  # -1 where nothing was counted
    nan = lambda x: float(x) if x >= 0 else float("nan")  # noqa: E731
    return {"ap": nan(st[0]), "ap@0.5": nan(st[1]), "ap@0.75": nan(st[2]), "ar": nan(st[5]),
            "oks": float(np.mean(oks)) if oks else float("nan"), "n_images": int((v > 0).any(1).sum())}


# ======================================================================================================
# The network
# ======================================================================================================
def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class _Res(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_cbr(ch, ch), nn.Conv2d(ch, ch, 3, 1, 1, bias=False), nn.BatchNorm2d(ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.body(x))


class PoseNet(nn.Module):
    """images [B, 3, S, S] in [-1, 1] -> (heatmap logits [B, 17, S/4, S/4], visibility logits [B, 17, 3]).
    ``width``: channels at 1/2 resolution (doubling-ish deeper)."""
    def __init__(self, image_size: int = 64, width: int = 16):
        super().__init__()
        self.image_size, self.width = image_size, width
        w = width
        c2, c4, c8, c16 = w, 2 * w, 3 * w, 4 * w
        self.stem = nn.Sequential(_cbr(3, c2, 2), _cbr(c2, c2))                 # 1/2
        self.down4 = nn.Sequential(_cbr(c2, c4, 2), _Res(c4))                    # 1/4
        self.down8 = nn.Sequential(_cbr(c4, c8, 2), _Res(c8))                    # 1/8
        self.down16 = nn.Sequential(_cbr(c8, c16, 2), _Res(c16), _Res(c16))      # 1/16: whole-image context
        self.lat8 = nn.Conv2d(c8, c16, 1)
        self.up8 = _cbr(c16, c8)
        self.lat4 = nn.Conv2d(c4, c8, 1)
        self.up4 = nn.Sequential(_cbr(c8, c8), _cbr(c8, c8))
        self.heatmap = nn.Conv2d(c8, N_JOINTS, 1)
        self.vis = nn.Linear(c16 + c8, N_JOINTS * len(VIS_CLASSES))

    def config(self) -> dict[str, Any]:
        return {"image_size": self.image_size, "width": self.width}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f4 = self.down4(self.stem(x))
        f8 = self.down8(f4)
        f16 = self.down16(f8)
        u8 = self.up8(F.interpolate(f16, scale_factor=2.0, mode="nearest") + self.lat8(f8))
        u4 = self.up4(F.interpolate(u8, scale_factor=2.0, mode="nearest") + self.lat4(f4))
        pooled = torch.cat([f16.mean((2, 3)), u4.mean((2, 3))], 1)
        return self.heatmap(u4), self.vis(pooled).view(-1, N_JOINTS, len(VIS_CLASSES))


def _heatmap_probs(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each heatmap's softmax [B, J, h, w] and the pixel centres (i + 0.5) / w along x and y."""
    B, J, h, w = logits.shape
    p = logits.flatten(2).softmax(-1).view(B, J, h, w)
    xs = (torch.arange(w, device=logits.device, dtype=logits.dtype) + 0.5) / w
    ys = (torch.arange(h, device=logits.device, dtype=logits.dtype) + 0.5) / h
    return p, xs, ys


def soft_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Heatmap logits [B, J, h, w] -> expected (x, y) [B, J, 2] in normalised image coordinates (pixel
    centres at (i + 0.5) / w)."""
    p, xs, ys = _heatmap_probs(logits)
    return torch.stack([(p.sum(2) * xs).sum(-1), (p.sum(3) * ys).sum(-1)], -1)


def _to_input(images: Any, size: int, device: torch.device) -> torch.Tensor:
    """uint8 [N, H, W, 3] (or float [N, 3, H, W] in [-1, 1]) -> float [N, 3, size, size] in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images
    if x.dtype == torch.uint8:
        if x.dim() != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images [N, H, W, 3], got {list(x.shape)}")
        x = to_model(x)
    x = x.to(device)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@torch.no_grad()
def predict(model: PoseNet, images: Any, batch_size: int = 256, with_scores: bool = False) -> Any:
    """Estimate poses of uint8 images [N, H, W, 3]: float32 [N, 17, 3] = (x, y, visibility code), codes
    from the visibility head (OUTSIDE, HIDDEN or VISIBLE); x, y always the heatmap position.

    ``with_scores=True`` returns (poses, scores [N]): a detection confidence for keypoint AP, the mean over
    joints of (the heatmap's softmax mass within 1.5 heatmap cells of the read-out position) x (the
    visibility head's probability that the joint is in the frame). A sharp, single-peaked map of a joint
    the head places in the frame scores near 1; a diffuse or doubled map, or a joint it thinks is outside,
    scores low."""
    model.eval()
    dev = next(model.parameters()).device
    out, scores = [], []
    n = len(images)
    for i in range(0, n, batch_size):
        hm, vl = model(_to_input(images[i:i + batch_size], model.image_size, dev))
        xy = soft_argmax(hm)
        code = torch.tensor(VIS_CLASSES, device=dev)[vl.argmax(-1)].float()
        out.append(torch.cat([xy, code[..., None]], -1).cpu())
        if with_scores:
            scores.append(_confidence(hm.float(), xy.float(), vl.float()).cpu())
    poses = torch.cat(out).numpy().astype(np.float32) if out else np.zeros((0, N_JOINTS, 3), np.float32)
    if not with_scores:
        return poses
    return poses, (torch.cat(scores).numpy().astype(np.float64) if scores else np.zeros(0))


def _confidence(logits: torch.Tensor, xy: torch.Tensor, vis_logits: torch.Tensor) -> torch.Tensor:
    h, w = logits.shape[-2:]
    p, xs, ys = _heatmap_probs(logits)
    d2 = ((xs.view(1, 1, 1, w) - xy[..., 0, None, None]) * w) ** 2 + ((ys.view(1, 1, h, 1) - xy[..., 1, None, None]) * h) ** 2
    mass = (p * (d2 <= 1.5 ** 2)).sum((2, 3))                                  # [B, J]
    in_frame = 1 - vis_logits.softmax(-1)[..., VIS_CLASSES.index(OUTSIDE)]    # [B, J]
    return (mass * in_frame).mean(1)


# ======================================================================================================
# Ground-truth renders
# ======================================================================================================
# a partial figure's chance per joint of being unlabelled (MISSING) and per visible joint of being HIDDEN:
# the real COCO persons of data/real_poses leave 4.2 of 17 joints unlabelled on average
PARTIAL_DROP = 0.25


def render_truth(n: int, seed: int, image_size: int = 64, render_size: int = 256, partial: float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` suitable characters of :mod:`kpnb.synth` with their exact poses: (uint8 [n, S, S, 3],
    float32 [n, 17, 3]). Drawn like the dataset's suitable images (render at ``render_size``, Lanczos to
    ``image_size``), each from ``default_rng([seed, 1_000_003, i])`` - a stream the dataset never uses.
    A share ``partial`` of them are partial figures, as people's annotations give poses: each joint MISSING
    (and each visible one HIDDEN) with probability :data:`PARTIAL_DROP` (:func:`kpnb.conditioning.mask_joints`),
    painted as :func:`render_poses` paints such a pose (the limbs to MISSING joints left out)."""
    imgs = np.zeros((n, image_size, image_size, 3), np.uint8)
    poses = np.zeros((n, N_JOINTS, 3), np.float32)
    for i in range(n):
        rng = np.random.default_rng([int(seed), 1_000_003, i])
        attrs = synth.sample_attributes(rng)
        pose, kind = synth.sample_pose(rng, facing=attrs["facing"])
        attrs["seat"] = kind == "sitting"
        attrs["framing"] = synth.framing_of(pose)
        if partial > 0 and rng.random() < partial:
            u = torch.from_numpy(rng.random((1, N_JOINTS, 2)))
            masked = mask_joints(torch.from_numpy(pose.to_array())[None], u, PARTIAL_DROP)[0]
            pose, attrs["seat"] = Pose.from_array(masked.numpy()), False
        imgs[i] = _render(pose, attrs, rng, image_size, render_size)
        poses[i] = pose.to_array()
    return imgs, poses


def render_poses(poses: Any, seed: int, image_size: int = 64, render_size: int = 256) -> np.ndarray:
    """Exact renders of given poses [N, 17, 3] (e.g. real ones): uint8 [N, S, S, 3], pose i drawn as a
    character of :func:`kpnb.synth.sample_attributes` from ``default_rng([seed, 1_000_033, i])``, rendered
    like :func:`render_truth`'s (``render_size``, Lanczos to ``image_size``), never on a seat. The painter
    guesses a MISSING shoulder or hip where the body needs one and leaves out a limb to any other MISSING
    joint. With the poses as the truth, :func:`ceiling` of these renders is the estimator's ceiling on them."""
    arr = check_poses(poses, name="render_poses poses").numpy()
    imgs = np.zeros((len(arr), image_size, image_size, 3), np.uint8)
    for i, p in enumerate(arr):
        rng = np.random.default_rng([int(seed), 1_000_033, i])
        attrs = synth.sample_attributes(rng)
        imgs[i] = _render(Pose.from_array(p), attrs, rng, image_size, render_size)
    return imgs


def _render(pose: Pose, attrs: dict[str, Any], rng: np.random.Generator, image_size: int, render_size: int) -> np.ndarray:
    im = synth.render_character(pose, attrs, render_size, rng).convert("RGB")
    if image_size != render_size:
        im = im.resize((image_size, image_size), Image.LANCZOS, reducing_gap=2.0)
    return np.asarray(im)


# ======================================================================================================
# Training
# ======================================================================================================
# the keys of a preset's estimator section that training reads (kpnb.runs.BASE holds their values)
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
    for c, k in _CODE_TO_CLASS.items():
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
    net = rt.ddp(model)

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
    result = training.train({"model": model}, {"opt": opt}, step_fn, batch_fn, steps=steps, ckpt_dir=ckpt_dir,
                            config=config, batch_size=bs, ckpt_every=int(c["ckpt_every"]), seed=seed,
                            desc="estimator", resume=resume, progress=progress, on_log=on_log, runtime=rt)
    return model.eval(), result


def load_estimator(ckpt_dir: str | Path) -> PoseNet:
    """The PoseNet of a :func:`train_estimator` checkpoint folder (or file), in eval mode."""
    return training.load_trained(ckpt_dir, "estimator", lambda c: PoseNet(**c), what="kpnb pose-estimator")


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


def ceiling(model: PoseNet, images: Any = None, poses: Any = None, *, n: int = 500, seed: int = 12345,
            render_size: int = 256, alphas: Sequence[float] = (0.05, 0.1, 0.2)) -> dict[str, float]:
    """The estimator's PCK and keypoint AP (:func:`pose_ap`) on held-out ground-truth renders: on
    ``images``/``poses`` when given, else on ``n`` fresh :func:`render_truth` renders (``seed`` must differ
    from the training renders')."""
    if images is None:
        images, poses = render_truth(n, seed, model.image_size, render_size)
    pred, scores = predict(model, images, with_scores=True)
    ap = pose_ap(pred, poses, scores)
    return {**pck(pred, poses, alphas), **{k: v for k, v in ap.items() if k != "n_images"}}
