"""Exact renders of poses: synthetic characters drawn in a given (or sampled) pose, the truth the pose
estimator learns from and is measured on."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from kpnb.poses.conditioning import check_poses, mask_joints
from kpnb.poses.pose import N_JOINTS, Pose
from kpnb.synth.characters import framing_of, sample_attributes, sample_pose
from kpnb.synth.painter import render_character

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
        attrs = sample_attributes(rng)
        pose, kind = sample_pose(rng, facing=attrs["facing"])
        attrs["seat"] = kind == "sitting"
        attrs["framing"] = framing_of(pose)
        if partial > 0 and rng.random() < partial:
            u = torch.from_numpy(rng.random((1, N_JOINTS, 2)))
            masked = mask_joints(torch.from_numpy(pose.to_array())[None], u, PARTIAL_DROP)[0]
            pose, attrs["seat"] = Pose.from_array(masked.numpy()), False
        imgs[i] = _render(pose, attrs, rng, image_size, render_size)
        poses[i] = pose.to_array()
    return imgs, poses


def render_poses(poses: Any, seed: int, image_size: int = 64, render_size: int = 256) -> np.ndarray:
    """Exact renders of given poses [N, 17, 3] (e.g. real ones): uint8 [N, S, S, 3], pose i drawn as a
    character of :func:`kpnb.sample_attributes` from ``default_rng([seed, 1_000_033, i])``, rendered
    like :func:`render_truth`'s (``render_size``, Lanczos to ``image_size``), never on a seat. The painter
    guesses a MISSING shoulder or hip where the body needs one and leaves out a limb to any other MISSING
    joint. With the poses as the truth, :func:`ceiling` of these renders is the estimator's ceiling on them."""
    arr = check_poses(poses, name="render_poses poses").numpy()
    imgs = np.zeros((len(arr), image_size, image_size, 3), np.uint8)
    for i, p in enumerate(arr):
        rng = np.random.default_rng([int(seed), 1_000_033, i])
        attrs = sample_attributes(rng)
        imgs[i] = _render(Pose.from_array(p), attrs, rng, image_size, render_size)
    return imgs


def _render(pose: Pose, attrs: dict[str, Any], rng: np.random.Generator, image_size: int, render_size: int) -> np.ndarray:
    im = render_character(pose, attrs, render_size, rng).convert("RGB")
    if image_size != render_size:
        im = im.resize((image_size, image_size), Image.LANCZOS, reducing_gap=2.0)
    return np.asarray(im)
