"""Pose accuracy: PCK and COCO keypoint AP as docs/metrics.md defines them, the estimator's ceiling, and the
pose fidelity of a generator (sample, estimate, score)."""
from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from kpnb.diffusion.ldm import KeypointLDM
from kpnb.diffusion.sampling import sample_images
from kpnb.models.pose_net import PoseNet, predict
from kpnb.models.transformer import CondTransformer
from kpnb.models.transformer import sample_images as sample_code_images
from kpnb.poses.conditioning import check_poses
from kpnb.poses.pose import HIDDEN, JOINT_GROUPS, JOINTS, MISSING, N_JOINTS, OUTSIDE, VIEWS, VISIBLE
from kpnb.synth.renders import render_truth


def pose_fidelity(model: KeypointLDM, vq: nn.Module, estimator: nn.Module, poses: Any, *,
                  ceiling: Mapping[str, float] | None = None, seed: int = 0,
                  sampler: Callable[..., np.ndarray] | None = None, target: Any = None,
                  **kw: Any) -> tuple[np.ndarray, dict[str, float]]:
    """Generate one image per pose, estimate its pose, and score it against the conditioning pose, or against
    ``target`` [N, 17, 3] where given (the annotation a completed pose came from:
    :func:`kpnb.poses.analysis.complete_poses`; ``docs/metrics.md``): returns (images, metrics) with the
    :func:`kpnb.evaluate.pose.pck` and :func:`kpnb.evaluate.pose.pose_ap` keys, ``sample_images_per_s`` and,
    given the estimator's ``ceiling`` (:func:`kpnb.evaluate.pose.ceiling`'s dict), ``<key>.ratio`` = number /
    ceiling for the PCK keys and AP. ``sampler(model, vq, poses, seed=, **kw) -> uint8 images``: another
    generator to score (e.g. :func:`kpnb.models.transformer.sample_images`); None = :func:`sample_images`.
    ``kw`` go to the sampler: ``batch_size`` (both samplers' default 50), the sampling settings."""
    poses = check_poses(poses)
    t0 = time.perf_counter()
    images = (sampler or sample_images)(model, vq, poses, seed=seed, **kw)
    secs = time.perf_counter() - t0
    truth = poses if target is None else check_poses(target, name="pose_fidelity target")
    if truth.shape != poses.shape:
        raise ValueError(f"pose_fidelity: target {list(truth.shape)} does not match the poses {list(poses.shape)}")
    pred, scores = predict(estimator, images, with_scores=True)
    metrics: dict[str, float] = dict(pck(pred, truth))
    metrics.update({k: v for k, v in pose_ap(pred, truth, scores).items() if k != "n_images"})
    metrics["sample_images_per_s"] = len(images) / secs
    if ceiling:
        for k in list(metrics):
            if (k.startswith("pck@") or k == "ap") and ceiling.get(k):
                metrics[f"{k}.ratio"] = metrics[k] / ceiling[k]
    return images, metrics


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
    groups of :data:`kpnb.poses.pose.JOINT_GROUPS` (the same two-level mean within the group), plus
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
    :func:`kpnb.poses.analysis.pose_views` of the conditioning poses): ``<view>.pck@<alpha>`` and ``<view>.n`` (poses)
    for each view present, in :data:`kpnb.poses.pose.VIEWS` order."""
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


def transformer_pose_fidelity(model: CondTransformer, vq: nn.Module, estimator: nn.Module, poses: Any, *,
                  ceiling: Mapping[str, float] | None = None, batch_size: int = 50, seed: int = 0,
                  **kw: Any) -> tuple[np.ndarray, dict[str, float]]:
    """As :func:`kpnb.evaluate.pose.pose_fidelity` (the same PCK and AP keys, ``sample_images_per_s`` and ``.ratio``
    to the ceiling), with the transformer's :func:`sample_images` as the sampler."""
    return pose_fidelity(model, vq, estimator, poses, ceiling=ceiling, batch_size=batch_size, seed=seed,
                          sampler=sample_code_images, **kw)
