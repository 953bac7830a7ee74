"""Poses as data: plausibility features, nearest training poses, completion of unlabelled joints, the view."""
from __future__ import annotations

from typing import Any

import numpy as np

from kpnb.poses.pose import HIDDEN, JOINT_INDEX, MISSING, N_JOINTS, VISIBLE, Pose


# ---- plausibility features ----------------------------------------------------------------------------
def _dist(xy: np.ndarray, a: int, b: int) -> float:
    return float(np.linalg.norm(xy[a] - xy[b]))


def plausibility_features(pose: Pose) -> dict[str, float]:
    """Numbers a pose filter can threshold (all scale-free except positions, which are in frame units).

    * ``frac_in_frame``: share of the 17 joints inside the frame
    * ``hip_mid_x``, ``hip_mid_y``: midpoint of the hips (may lie outside 0..1, e.g. portraits)
    * ``shoulder_mid_x``, ``shoulder_mid_y``
    * ``torso``: shoulder-mid to hip-mid distance; limb ratios below are relative to it
    * ``upper_arm_ratio``, ``forearm_ratio``, ``thigh_ratio``, ``shin_ratio``: mean of left/right, / torso
    * ``arm_asym``, ``leg_asym``: |left - right| / (left + right) of total arm and leg length
    * ``shoulder_ratio``: shoulder width / torso
    * ``head_ratio``: nose to shoulder-mid / torso
    * ``wrist_reach``: max wrist-to-own-shoulder distance / torso (arms longer than possible when large)
    * ``lr_consistency``: share of left/right pairs (eyes, ears, shoulders, hips) whose left-right order
      along the shoulder axis agrees with the shoulders' (1 = all consistent, e.g. not a scrambled pose)
    """
    xy = pose.xy
    J = JOINT_INDEX
    sh_mid = (xy[J["shoulder_left"]] + xy[J["shoulder_right"]]) / 2
    hip_mid = (xy[J["hip_left"]] + xy[J["hip_right"]]) / 2
    torso = max(float(np.linalg.norm(sh_mid - hip_mid)), 1e-4)

    def pair(a: str, b: str) -> tuple[float, float]:
        return _dist(xy, J[a + "_left"], J[b + "_left"]), _dist(xy, J[a + "_right"], J[b + "_right"])

    ua, fa, th, sn = pair("shoulder", "elbow"), pair("elbow", "wrist"), pair("hip", "knee"), pair("knee", "ankle")
    arm_l, arm_r = ua[0] + fa[0], ua[1] + fa[1]
    leg_l, leg_r = th[0] + sn[0], th[1] + sn[1]
    axis = xy[J["shoulder_left"]] - xy[J["shoulder_right"]]
    n = float(np.linalg.norm(axis))
    consistent = []
    if n > 1e-6:
        axis = axis / n
        for part in ("eye", "ear", "hip"):
            d = float(np.dot(xy[J[part + "_left"]] - xy[J[part + "_right"]], axis))
            consistent.append(d >= 0)
    return {
        "frac_in_frame": float(pose.in_frame.mean()),
        "hip_mid_x": float(hip_mid[0]), "hip_mid_y": float(hip_mid[1]),
        "shoulder_mid_x": float(sh_mid[0]), "shoulder_mid_y": float(sh_mid[1]),
        "torso": torso,
        "upper_arm_ratio": (ua[0] + ua[1]) / 2 / torso,
        "forearm_ratio": (fa[0] + fa[1]) / 2 / torso,
        "thigh_ratio": (th[0] + th[1]) / 2 / torso,
        "shin_ratio": (sn[0] + sn[1]) / 2 / torso,
        "arm_asym": abs(arm_l - arm_r) / max(arm_l + arm_r, 1e-6),
        "leg_asym": abs(leg_l - leg_r) / max(leg_l + leg_r, 1e-6),
        "shoulder_ratio": n / torso,
        "head_ratio": float(np.linalg.norm(xy[J["nose"]] - sh_mid)) / torso,
        "wrist_reach": max(_dist(xy, J["wrist_left"], J["shoulder_left"]),
                           _dist(xy, J["wrist_right"], J["shoulder_right"])) / torso,
        "lr_consistency": float(np.mean(consistent)) if consistent else 0.0,
    }


# ---- how close a pose set comes to given poses ---------------------------------------------------------
def _pose_rows(poses: Any, dtype: Any = np.float32) -> np.ndarray:
    """Poses given as Poses or [17, 3] arrays, stacked into one array [N, 17, 3]."""
    return np.asarray([p.to_array() if isinstance(p, Pose) else np.asarray(p) for p in poses], dtype)


def nearest_poses(poses: Any, reference: Any, alpha: float = 0.1) -> dict[str, np.ndarray]:
    """For each pose of ``poses`` ([N, 17, 3] or Poses), the nearest pose of ``reference`` ([M, 17, 3] or Poses,
    every joint taken where it is placed: synthetic poses keep the coordinates of joints outside the frame).

    Each reference pose is first fitted to the pose by a scale and a shift (least squares over the joints
    labelled in the pose; no rotation, so a tilt counts as a difference). Distances are divided by the pose's
    size, max(w, h) of its labelled joints' bounding box, as in PCK. Returns per pose: ``distance`` (the
    nearest reference pose's mean joint distance), ``pck`` (its share of joints within ``alpha`` of the size),
    ``index`` (which reference pose) and ``fitted`` [N, 17, 2] (all 17 joints of that reference pose after the
    fit); NaN and -1 for poses with fewer than two labelled joints."""
    P = _pose_rows(poses)
    ref = _pose_rows(reference, np.float64)[..., :2]
    n = len(P)
    out = {"distance": np.full(n, np.nan), "pck": np.full(n, np.nan), "index": np.full(n, -1),
           "fitted": np.full((n, N_JOINTS, 2), np.nan)}
    for i, p in enumerate(P):
        lab = p[:, 2] != MISSING
        if lab.sum() < 2:
            continue
        r = p[lab, :2].astype(np.float64)
        size = max(float((r.max(0) - r.min(0)).max()), 1e-6)
        rc = r - r.mean(0)
        s = ref[:, lab]
        s_mean = s.mean(1, keepdims=True)
        sc = s - s_mean                                                     # [M, k, 2]
        scale = np.clip((sc * rc).sum((1, 2)) / np.maximum((sc * sc).sum((1, 2)), 1e-12), 0, None)
        d = np.linalg.norm(scale[:, None, None] * sc - rc, axis=-1) / size  # [M, k]
        mean = d.mean(1)
        j = int(mean.argmin())
        out["distance"][i], out["pck"][i], out["index"][i] = mean[j], (d[j] <= alpha).mean(), j
        out["fitted"][i] = (ref[j] - s_mean[j]) * scale[j] + r.mean(0)
    return out


def nearest_as_placed(pose: Any, poses: Any, k: int) -> np.ndarray:
    """Indices of the ``k`` poses of ``poses`` [N, 17, 3] nearest to ``pose`` [17, 3] where they stand, without
    :func:`nearest_poses`' fit: the mean distance over the joints in the frame (VISIBLE or HIDDEN) in both, in
    frame units; a pose with fewer than 5 such joints in common is never near (sorted last). Ties keep the
    order of ``poses``."""
    p, q = np.asarray(pose, np.float64), np.asarray(poses, np.float64)
    both = np.isin(q[..., 2], (VISIBLE, HIDDEN)) & np.isin(p[None, :, 2], (VISIBLE, HIDDEN))
    d = np.linalg.norm(q[..., :2] - p[None, :, :2], axis=-1)
    mean = np.where(both.sum(1) >= 5, (d * both).sum(1) / np.maximum(both.sum(1), 1), np.inf)
    return np.argsort(mean, kind="stable")[:k]


def complete_poses(poses: Any, reference: Any) -> np.ndarray:
    """Poses [N, 17, 3] (or Poses) with every MISSING joint given a place and a code: those of the nearest
    ``reference`` pose (:func:`nearest_poses`: fitted by scale and shift over the labelled joints), then
    OUTSIDE where that place is out of the frame. Labelled joints are kept as they are.

    People's annotations leave joints unlabelled that kpnb's poses always place: COCO labels no face joint
    it cannot see (a figure from behind has no nose or eyes, a profile no far eye) and no leg the photograph
    cuts off, where a run's training poses give every joint in the frame (VISIBLE) and beyond it (OUTSIDE).
    With the run's training poses as ``reference``, the completed pose is in the convention the model was
    trained on. Scores stay against the annotation as given."""
    P, ref = _pose_rows(poses), _pose_rows(reference)
    if ref.ndim != 3 or ref.shape[1:] != (N_JOINTS, 3) or not len(ref):
        raise ValueError(f"complete_poses: reference must be poses [M, 17, 3] with M > 0, got {list(ref.shape)}")
    nn = nearest_poses(P, ref)
    out = P.copy()
    for i, j in enumerate(nn["index"]):
        miss = P[i, :, 2] == MISSING
        if j < 0 or not miss.any():
            continue
        fill = miss & (ref[j, :, 2] != MISSING)
        out[i, fill, :2] = nn["fitted"][i, fill]
        out[i, fill, 2] = ref[j, fill, 2]
        out[i, fill, 2] = Pose.from_array(out[i]).refresh_outside().vis[fill]   # re-judged against this frame
    return out


def pose_views(poses: Any, side_ratio: float = 0.35) -> np.ndarray:
    """Which way each figure of ``poses`` ([N, 17, 3] or Poses) faces, read from its shoulders alone: the
    signed shoulder width (the left shoulder's x minus the right's, whatever the codes other than MISSING)
    over the torso (shoulder midpoint to hip midpoint). Facing the viewer her left shoulder is on the image's
    right, so the width is positive: "front" above ``side_ratio``, "back" below ``-side_ratio``, "side" in
    between (a profile); "unknown" when a shoulder or a hip is MISSING. Returns strings of :data:`VIEWS`."""
    P = _pose_rows(poses, np.float64)
    J = JOINT_INDEX
    ls, rs = P[:, J["shoulder_left"]], P[:, J["shoulder_right"]]
    lh, rh = P[:, J["hip_left"]], P[:, J["hip_right"]]
    torso = np.linalg.norm((ls[:, :2] + rs[:, :2]) / 2 - (lh[:, :2] + rh[:, :2]) / 2, axis=1)
    ratio = (ls[:, 0] - rs[:, 0]) / np.maximum(torso, 1e-6)
    known = (np.stack([ls, rs, lh, rh], 1)[..., 2] != MISSING).all(1)
    return np.select([~known, ratio > side_ratio, ratio < -side_ratio], ["unknown", "front", "back"], "side")
