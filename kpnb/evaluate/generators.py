"""Scoring a trained generator beyond one PCK number: on the real-pose set (against the estimator's ceiling on
exact renders of the same poses), FID and KID over sample seeds, the FID of the head region, a guidance sweep
and DDIM speed. Notebook 05 (diffusion) and notebook 07 (the transformer, :func:`fid_over_seeds`) report them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from kpnb.diffusion.sampling import ddim_sample
from kpnb.evaluate.pose import ceiling, pck_by_view, pose_fidelity
from kpnb.evaluate.quality import ImageDistance, crop_boxes, head_boxes, spread
from kpnb.models.pose_net import predict
from kpnb.poses.analysis import pose_views
from kpnb.synth.renders import render_poses


@dataclass
class RealPoseRun:
    """One conditioning of the real poses (as annotated, or completed): what :func:`real_pose_scores` returns."""

    renders: np.ndarray           # exact renders of the conditioning poses (the ceiling's images)
    ceiling: dict[str, float]     # the estimator on those renders, scored against the annotation
    images: np.ndarray            # the first seed's samples
    scores: dict[str, float]      # pose_fidelity's keys, mean over the seeds, and pck@0.1_spread
    by_view: dict[str, float]     # PCK@0.1 per view of the conditioning poses (mean over seeds) and poses per view


def real_pose_scores(model: nn.Module, vq: nn.Module, estimator: nn.Module, cond: np.ndarray, target: np.ndarray, *,
                     seeds: Sequence[int], render_size: int, **sample_kw: Any) -> RealPoseRun:
    """Sample ``model`` for the conditioning poses ``cond`` once per seed and score each draw against ``target``
    (the annotation as given: a completed joint is never scored), beside the estimator's ceiling on exact
    renders of ``cond`` (seed 0, at ``render_size`` like the dataset). Few poses make a noisy number, so the
    scores are the mean over ``seeds`` with half their range as ``pck@0.1_spread``."""
    renders = render_poses(cond, seed=0, image_size=estimator.image_size, render_size=render_size)
    ceil = ceiling(estimator, renders, target)
    draws = [pose_fidelity(model, vq, estimator, cond, target=target, ceiling=ceil, seed=s, **sample_kw)
             for s in seeds]
    scores = {k: float(np.mean([d[1][k] for d in draws])) for k in draws[0][1]}
    scores.update(spread([d[1] for d in draws], "pck@0.1"))
    views = pose_views(cond)
    by_view = [pck_by_view(predict(estimator, d[0]), target, views) for d in draws]
    mean_by_view = {k: by_view[0][k] if k.endswith(".n") else float(np.mean([b[k] for b in by_view]))
                    for k in by_view[0]}
    return RealPoseRun(renders, ceil, draws[0][0], scores, mean_by_view)


def fid_over_seeds(dist: ImageDistance, first: np.ndarray, sample: Callable[[int], np.ndarray],
                   seeds: Sequence[int]) -> dict[str, float]:
    """FID and KID (``fid``, ``fid_spread``, ``kid``, ``kid_spread``: the mean and half the range) of one draw of
    samples per seed; seed 0's draw is ``first`` (the samples already scored for PCK), the others come from
    ``sample(seed)``."""
    draws = [dist.score(first if seed == 0 else sample(seed), seed=seed) for seed in seeds]
    return {**spread(draws, "fid"), **spread(draws, "kid")}


def head_fid(dist: ImageDistance, real_images: np.ndarray, real_poses: np.ndarray, samples: Mapping[str, np.ndarray],
             poses: np.ndarray, kid_subset_size: int) -> dict[str, float]:
    """FID of the head region alone (:func:`kpnb.evaluate.quality.head_boxes`, in ``dist``'s features): each
    named set of ``samples`` (drawn for ``poses``) cut to its poses' head boxes, against the real images' heads."""
    heads = ImageDistance(crop_boxes(real_images, head_boxes(real_poses)), dist.features,
                          kid_subset_size=kid_subset_size)
    boxes = head_boxes(poses)
    return {name: heads.score(crop_boxes(images, boxes))["fid"] for name, images in samples.items()}


def guidance_sweep(model: nn.Module, vq: nn.Module, estimator: nn.Module, poses: np.ndarray, dist: ImageDistance,
                   scales: Sequence[float], **sample_kw: Any) -> dict[Any, dict[str, float]]:
    """For each classifier-free guidance scale (the other DDIM settings ``sample_kw``, seed 0): PCK@0.1 and AP of
    one sample per pose, and the FID and KID of those samples. Keyed by the scales as given."""
    out = {}
    for g in scales:
        images, m = pose_fidelity(model, vq, estimator, poses, seed=0, **{**sample_kw, "guidance": float(g)})
        q = dist.score(images)
        out[g] = {"pck@0.1": m["pck@0.1"], "ap": m["ap"], "fid": q["fid"], "kid": q["kid"]}
    return out


def ddim_speed(model: nn.Module, poses: np.ndarray, guidance: Mapping[str, float], steps: int = 50) -> dict[str, float]:
    """Latents per second of deterministic DDIM with ``steps`` steps for ``poses``, once per named guidance scale
    (a scale other than 1 runs the UNet twice per step)."""
    speed = {}
    for name, g in guidance.items():
        t0 = time.perf_counter()
        ddim_sample(model, poses, steps=steps, eta=0.0, guidance=g, seed=0)
        speed[name] = len(poses) / (time.perf_counter() - t0)
    return speed
