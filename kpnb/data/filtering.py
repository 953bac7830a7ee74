"""The dataset filter: stages that each return a keep mask and a reason per removed image, and their report.

Stages (in chain order), after the original study's analysis of the Danbooru pose release:

1. ``tags``: rating and revealing tags (comic, monochrome, several characters, scenery, borders, ...).
   Tags are noisy: they miss a share of distractors, so this stage cannot do the job alone.
2. ``image``: pixels - big black borders with little content, near-monochrome images (sketches), and
   comic pages (a bright page split by straight gutters).
3. ``pose``: plausibility of the keypoint file - the original plotted the hip midpoint and removed images
   whose shoulders and wrists sat oddly; here: left/right order consistent, limb lengths in a human range
   relative to the torso, hip midpoint where a figure's hips can be, enough of the head in the frame.
4. ``clip`` (optional): a positive description against negatives, scored by a CLIP model
   (:func:`kpnb.models.clip.clip_filter_scores`); filled in when a CLIP is available.

Every stage is a function ``(candidates, **thresholds) -> StageResult``. :func:`run_chain` applies them in
order and :func:`report` gives, per stage and for the chain, kept counts, what each removed, and precision
and recall of "suitable" where ground truth exists (the synthetic pool).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from kpnb.poses.analysis import plausibility_features
from kpnb.poses.pose import JOINT_INDEX, VISIBLE, Pose


@dataclass
class StageResult:
    name: str
    keep: np.ndarray                      # bool [N]
    reasons: list[str]                    # "" for kept, else why removed
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # per-image numbers the stage looked at


# ---- stage 1: tags --------------------------------------------------------------------------------------
BAD_TAGS = {
    "comic": "comic", "4koma": "comic", "manga": "comic",
    "monochrome": "monochrome", "greyscale": "monochrome", "sketch": "monochrome", "lineart": "monochrome",
    "multiple_girls": "several characters", "2girls": "several characters", "3girls": "several characters",
    "multiple_boys": "several characters", "group": "several characters",
    "scenery": "no character", "no_humans": "no character", "landscape": "no character",
    "letterboxed": "border", "black_border": "border", "pillarboxed": "border",
}
BAD_RATINGS = {"e": "rating explicit"}


def stage_tags(cands: Any, bad_tags: Mapping[str, str] = BAD_TAGS,
               bad_ratings: Mapping[str, str] = BAD_RATINGS) -> StageResult:
    reasons = []
    for m in cands.meta:
        why = bad_ratings.get(m.get("rating", ""), "")
        if not why:
            hit = [bad_tags[t] for t in m.get("tag_names", []) if t in bad_tags]
            why = f"tag: {hit[0]}" if hit else ""
        reasons.append(why)
    keep = np.array([r == "" for r in reasons], dtype=bool)
    return StageResult("tags", keep, reasons)


# ---- stage 2: image content -----------------------------------------------------------------------------
def _bordered_runs(white: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Per image: runs of white rows (or columns) inside the image with a panel line on both sides."""
    out = np.zeros(white.shape[0], np.int64)
    for i in range(white.shape[0]):
        w, j, L = white[i], 0, white.shape[1]
        while j < L:
            if w[j]:
                s = j
                while j < L and w[j]:
                    j += 1
                if s > 0 and j < L and line[i, s - 1] and line[i, j]:
                    out[i] += 1
            else:
                j += 1
    return out


IMAGE_CHUNK = 64  # images per float32 block: bounds memory to ~16 copies of 64 images, whatever the shard size


def image_features(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image numbers: ``border_frac`` (share of the frame in near-black full rows/columns at the edges),
    ``saturation`` (mean HSV saturation), ``gutters`` (white full-length rows/columns with a dark panel line
    on both sides: the gutters between a comic page's panels), ``content_std`` (luminance spread).
    Computed in blocks of :data:`IMAGE_CHUNK` images (per-image numbers, so the blocks do not interact)."""
    if len(images) > IMAGE_CHUNK:
        parts = [_image_features(images[i:i + IMAGE_CHUNK]) for i in range(0, len(images), IMAGE_CHUNK)]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return _image_features(images)


def _image_features(images: np.ndarray) -> dict[str, np.ndarray]:
    x = images.astype(np.float32) / 255.0
    n, h, w, _ = x.shape
    lum = x.mean(-1)
    dark_rows = (lum.max(axis=2) < 0.08)            # [N, H]: a full row near black
    dark_cols = (lum.max(axis=1) < 0.08)            # [N, W]

    def edge_run(mask: np.ndarray) -> np.ndarray:
        # length of the near-black run from each edge
        first = np.argmin(mask, axis=1)
        first[mask.all(axis=1)] = mask.shape[1]
        last = np.argmin(mask[:, ::-1], axis=1)
        last[mask.all(axis=1)] = 0
        return first + last

    border = np.maximum(edge_run(dark_rows) / h, edge_run(dark_cols) / w)
    mx, mn = x.max(-1), x.min(-1)
    sat = np.where(mx > 1e-3, (mx - mn) / np.maximum(mx, 1e-3), 0.0)
    white = lum > 0.8
    line = lum < 0.6
    gutters = (_bordered_runs(white.mean(2) > 0.97, line.mean(2) > 0.6)
               + _bordered_runs(white.mean(1) > 0.97, line.mean(1) > 0.6))
    return {"border_frac": border, "saturation": sat.reshape(n, -1).mean(1),
            "gutters": gutters.astype(np.float32), "content_std": lum.reshape(n, -1).std(1)}


def stage_image(cands: Any, max_border: float = 0.25, min_saturation: float = 0.025,
                max_gutters: float = 0, min_content_std: float = 0.002) -> StageResult:
    f = image_features(cands.images)
    reasons = []
    for i in range(len(cands.images)):
        if f["border_frac"][i] > max_border:
            reasons.append("image: black border")
        elif f["content_std"][i] < min_content_std:
            reasons.append("image: no content")
        elif f["saturation"][i] < min_saturation:
            reasons.append("image: monochrome")
        elif f["gutters"][i] > max_gutters:
            reasons.append("image: comic panels")
        else:
            reasons.append("")
    return StageResult("image", np.array([r == "" for r in reasons]), reasons, f)


# ---- stage 3: pose plausibility -------------------------------------------------------------------------
# Ranges of plausibility_features for a single drawn figure. Anime proportions are generous (big heads,
# long legs) and poses vary (kneeling shins pointing away, a torso leaning towards the viewer makes every
# ratio to it larger, a lying figure's hips beside the frame), so the ranges are wide; they catch scrambled or
# mixed-up keypoints, not unusual poses.
POSE_LIMITS: dict[str, tuple[float, float]] = {
    "lr_consistency": (0.99, 1.0),   # eyes, ears, hips on the same side as the shoulders
    "upper_arm_ratio": (0.25, 0.9),
    "forearm_ratio": (0.17, 0.8),
    "thigh_ratio": (0.0, 1.2),       # no lower bound: a seated figure's thighs point at the viewer
    "shin_ratio": (0.04, 1.25),      # a kneeling figure's shins point away from the viewer
    "arm_asym": (0.0, 0.6),          # one arm reaching towards the viewer, the other down
    "leg_asym": (0.0, 0.3),
    "shoulder_ratio": (0.17, 1.15),  # side views to a torso leaning towards the viewer
    "head_ratio": (0.25, 0.8),
    "wrist_reach": (0.26, 1.75),     # both hands at the face
    "hip_mid_x": (-0.5, 1.5),        # a lying figure's upper body: the hips beside the frame
    "hip_mid_y": (0.38, 1.45),       # below 1.0: the hips are in the frame; up to 1.45: half-body crops
    "torso": (0.09, 0.7),
}


def pose_feature_table(poses: np.ndarray) -> dict[str, np.ndarray]:
    rows = [plausibility_features(Pose.from_array(p)) for p in poses]
    keys = rows[0].keys() if rows else POSE_LIMITS.keys()
    return {k: np.array([r[k] for r in rows], dtype=np.float32) for k in keys}


def stage_pose(cands: Any, limits: Mapping[str, tuple[float, float]] = POSE_LIMITS,
               min_head_in_frame: int = 3) -> StageResult:
    f = pose_feature_table(cands.poses)
    head = [JOINT_INDEX[n] for n in ("nose", "eye_left", "eye_right", "ear_left", "ear_right")]
    in_frame = (cands.poses[:, :, 2] == 2) | (cands.poses[:, :, 2] == 1)
    f["head_in_frame"] = in_frame[:, head].sum(1).astype(np.float32)
    reasons = []
    for i in range(len(cands.poses)):
        why = ""
        if f["head_in_frame"][i] < min_head_in_frame:
            why = "pose: head not in frame"
        else:
            for k, (lo, hi) in limits.items():
                v = f[k][i]
                if not (lo <= v <= hi):
                    why = f"pose: {k} {'low' if v < lo else 'high'}"
                    break
        reasons.append(why)
    return StageResult("pose", np.array([r == "" for r in reasons]), reasons, f)


# ---- stage 4: CLIP prompt score (hook) ------------------------------------------------------------------
CLIP_POSITIVE = "a single anime character with a visible pose"
CLIP_NEGATIVES = ["a comic page", "scenery without people", "several characters",
                  "a monochrome sketch", "an image with big black borders"]


def stage_clip(cands: Any, score_fn: Callable[[np.ndarray], np.ndarray], min_score: float = 0.5) -> StageResult:
    """Keep images whose probability of the positive description (vs the negatives) is >= ``min_score``.
    ``score_fn(images) -> [N]`` is e.g. ``lambda ims: clip_filter_scores(model, ims, CLIP_POSITIVE, CLIP_NEGATIVES)``."""
    s = np.asarray(score_fn(cands.images), dtype=np.float32)
    reasons = ["" if v >= min_score else "clip: low prompt score" for v in s]
    return StageResult("clip", s >= min_score, reasons, {"clip_score": s})


# ---- chain and report -----------------------------------------------------------------------------------
def run_chain(cands: Any, stages: list[Callable[[Any], StageResult]]) -> list[StageResult]:
    """Apply every stage to the whole pool (so each can be judged alone as well as in the chain)."""
    return [stage(cands) for stage in stages]


def precision_recall(keep: np.ndarray, truth: np.ndarray | None) -> tuple[float | None, float | None]:
    if truth is None:
        return None, None
    tp = float((keep & truth).sum())
    precision = tp / keep.sum() if keep.sum() else 0.0
    recall = tp / truth.sum() if truth.sum() else 0.0
    return precision, recall


def report(cands: Any, results: list[StageResult]) -> dict[str, Any]:
    """Flat metrics: the chain's kept count, precision and recall; per stage, alone and as applied in the
    chain (to what earlier stages kept): removed count, precision/recall, and what it removed by label."""
    truth = cands.suitable
    labels = [l.get("label", "?") for l in cands.labels] if cands.labels else None
    out: dict[str, Any] = {"n_candidates": len(cands), "n_skipped_files": cands.problems.total}
    chain_keep = np.ones(len(cands), dtype=bool)
    for r in results:
        removed_in_chain = chain_keep & ~r.keep
        chain_keep = chain_keep & r.keep
        p_alone, rec_alone = precision_recall(r.keep, truth)
        p_chain, rec_chain = precision_recall(chain_keep, truth)
        out[f"{r.name}.removed_alone"] = int((~r.keep).sum())
        out[f"{r.name}.removed_in_chain"] = int(removed_in_chain.sum())
        out[f"{r.name}.precision_alone"] = p_alone
        out[f"{r.name}.recall_alone"] = rec_alone
        out[f"{r.name}.precision_chain"] = p_chain
        out[f"{r.name}.recall_chain"] = rec_chain
        if labels is not None:
            for lab in sorted(set(labels)):
                m = np.array([l == lab for l in labels])
                out[f"{r.name}.removed_in_chain.{lab}"] = int((removed_in_chain & m).sum())
    out["n_kept"] = int(chain_keep.sum())
    out["precision"], out["recall"] = precision_recall(chain_keep, truth)
    if truth is not None:
        out["n_suitable"] = int(truth.sum())
    return out


# The original kept 363k images with plausible poses and trained its f8 model on a stricter 101k; its write-up
# blamed that model's weakness on too little data. kpnb's strict variant keeps, of the loose subset, the
# figures drawn whole: every joint inside the frame and none hidden (about a third of the synthetic subset).
STRICT_RULE = "every joint inside the frame and visible: whole, unoccluded figures"


def strict_keep(poses: np.ndarray) -> np.ndarray:
    """Per pose [N, 17, 3] (kpnb's layout: x, y, visibility): whether it passes the strict filter
    (:data:`STRICT_RULE`), applied on top of the chain's kept subset."""
    vis = np.asarray(poses)[..., 2]
    return (vis == VISIBLE).all(axis=-1)


def chain_keep(results: list[StageResult]) -> np.ndarray:
    keep = results[0].keep.copy()
    for r in results[1:]:
        keep &= r.keep
    return keep
