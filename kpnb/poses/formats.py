"""Pose files in and out: the release JSON (row first, 512x512 frame), COCO keypoint annotations, OpenPose JSON."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from kpnb.poses.pose import (
    HIDDEN,
    JOINT_INDEX,
    JOINTS,
    MAX_COORD,
    MISSING,
    N_JOINTS,
    RELEASE_FRAME,
    VISIBLE,
    Pose,
    PoseError,
)


# ---- format A: the Danbooru keypoint release ----------------------------------------------------------
def _number(v: Any, *, source: Any, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PoseError(f"expected a number, got {type(v).__name__} {v!r:.40}", source=source, field=field)
    try:
        f = float(v)
    except OverflowError:  # a huge JSON integer
        f = math.inf
    if not math.isfinite(f) or abs(f) > MAX_COORD:
        raise PoseError(f"expected a finite number within +-{MAX_COORD:g}, got {v!r:.40}", source=source, field=field)
    return f


def pose_from_release(obj: Any, *, source: str | Path | None = None, frame: int = RELEASE_FRAME) -> Pose:
    """Read the release format: ``{"nose": [y, x], ...}`` pixels in a ``frame`` x ``frame`` square.

    Values outside [0, frame) are kept and marked OUTSIDE (never clamped). Every joint name must be present.
    """
    if not isinstance(obj, dict):
        raise PoseError(f"expected a JSON object of 17 joints, got {type(obj).__name__}", source=source)
    missing = [n for n in JOINTS if n not in obj]
    if missing:
        raise PoseError(f"missing joint(s) {', '.join(missing)}", source=source, field=missing[0])
    xy = np.zeros((N_JOINTS, 2), np.float32)
    for i, name in enumerate(JOINTS):
        v = obj[name]
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise PoseError(f"expected [y, x], got {v!r:.60}", source=source, field=name)
        y = _number(v[0], source=source, field=name)
        x = _number(v[1], source=source, field=name)
        xy[i] = (x / frame, y / frame)
    return Pose.from_pixels(xy * frame, frame)


def pose_to_release(pose: Pose, frame: int = RELEASE_FRAME) -> dict[str, list[float]]:
    """Write the release format. MISSING joints have no representation there and are refused."""
    if (pose.vis == MISSING).any():
        names = [JOINTS[i] for i in np.flatnonzero(pose.vis == MISSING)]
        raise PoseError(f"the release format has no missing joints; missing: {', '.join(names)}", field=names[0])
    return {name: [float(pose.xy[i, 1] * frame), float(pose.xy[i, 0] * frame)] for i, name in enumerate(JOINTS)}


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PoseError(f"cannot read file ({e.__class__.__name__}: {e})", source=path) from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise PoseError(f"not valid JSON ({e})", source=path) from e


def read_release_json(path: str | Path, frame: int = RELEASE_FRAME) -> Pose:
    return pose_from_release(_read_json(path), source=path, frame=frame)


def read_pose_dir(path: str | Path, min_joints: int = 4) -> tuple[list[str], list[Pose]]:
    """The poses of a pose file or a folder of them, in any format :func:`read_pose_file` reads (release JSON,
    COCO, OpenPose), sorted by file name: (labels, poses in the square frame). People with too few joints are
    left out (with a warning); a bad file raises :class:`PoseError` naming it; no usable pose is refused."""
    poses, skipped = read_pose_file(path, min_joints=min_joints)
    for msg in skipped:
        warnings.warn(msg, stacklevel=2)
    if not poses:
        raise FileNotFoundError(f"{path}: no usable poses here")
    return [label for label, _ in poses], [pose for _, pose in poses]


def write_release_json(pose: Pose, path: str | Path, frame: int = RELEASE_FRAME) -> None:
    Path(path).write_text(json.dumps(pose_to_release(pose, frame)))


# ---- format B: COCO person keypoints ------------------------------------------------------------------
def pose_from_coco(keypoints: Any, width: float, height: float, *, source: Any = None,
                   field: str = "keypoints") -> Pose:
    """``[x1, y1, v1, ..., x17, y17, v17]`` in pixels of a ``width`` x ``height`` image -> Pose.

    v = 0 -> MISSING, 1 -> HIDDEN, 2 -> VISIBLE; labelled joints outside the image become OUTSIDE.
    Coordinates are normalised by width and height separately (the image's own frame).
    """
    w = _number(width, source=source, field="width")
    h = _number(height, source=source, field="height")
    if w <= 0 or h <= 0:
        raise PoseError(f"image size must be positive, got {w}x{h}", source=source, field="width/height")
    if not isinstance(keypoints, (list, tuple)) or len(keypoints) != 3 * N_JOINTS:
        n = len(keypoints) if isinstance(keypoints, (list, tuple)) else type(keypoints).__name__
        raise PoseError(f"expected a list of 51 numbers, got {n}", source=source, field=field)
    xy = np.zeros((N_JOINTS, 2), np.float32)
    vis = np.zeros(N_JOINTS, np.int8)
    for i in range(N_JOINTS):
        x = _number(keypoints[3 * i], source=source, field=f"{field}[{3 * i}]")
        y = _number(keypoints[3 * i + 1], source=source, field=f"{field}[{3 * i + 1}]")
        v = _number(keypoints[3 * i + 2], source=source, field=f"{field}[{3 * i + 2}]")
        if v not in (0, 1, 2):
            raise PoseError(f"visibility must be 0, 1 or 2, got {v}", source=source, field=f"{field}[{3 * i + 2}]")
        if v == 0:
            continue
        xy[i] = (x / w, y / h)
        vis[i] = HIDDEN if v == 1 else VISIBLE
    return Pose(xy, vis).refresh_outside()


def pose_to_coco(pose: Pose, width: float, height: float) -> list[float]:
    """Pose -> COCO keypoint list. COCO cannot say "outside the frame": such joints are written as v=1
    (labelled, not visible) with their out-of-image coordinates, which :func:`pose_from_coco` marks OUTSIDE again."""
    out: list[float] = []
    for i in range(N_JOINTS):
        v = int(pose.vis[i])
        if v == MISSING:
            out += [0.0, 0.0, 0]
        else:
            out += [float(pose.xy[i, 0] * width), float(pose.xy[i, 1] * height), 2 if v == VISIBLE else 1]
    return out


def read_coco(obj_or_path: Any) -> list[dict[str, Any]]:
    """Read COCO person keypoints: a full COCO file (``images`` + ``annotations``), a list of annotations
    (each with ``width``/``height``), or one annotation. Returns one record per person:
    ``{"image_id", "pose", "bbox", "width", "height"}``."""
    source = None
    obj = obj_or_path
    if isinstance(obj_or_path, (str, Path)):
        source = obj_or_path
        obj = _read_json(obj_or_path)
    sizes: dict[Any, tuple[float, float]] = {}
    if isinstance(obj, dict) and "annotations" in obj:
        images = obj.get("images", [])
        if not isinstance(images, list):
            raise PoseError("'images' must be a list", source=source, field="images")
        for k, im in enumerate(images):
            if not isinstance(im, dict) or "id" not in im:
                raise PoseError("each image needs an 'id'", source=source, field=f"images[{k}]")
            sizes[im["id"]] = (im.get("width"), im.get("height"))
        anns = obj["annotations"]
    elif isinstance(obj, dict):
        anns = [obj]
    else:
        anns = obj
    if not isinstance(anns, list):
        raise PoseError("expected annotations as a list", source=source, field="annotations")
    people = []
    for k, ann in enumerate(anns):
        f = f"annotations[{k}]"
        if not isinstance(ann, dict) or "keypoints" not in ann:
            raise PoseError("annotation without 'keypoints'", source=source, field=f)
        iid = ann.get("image_id")
        w, h = ann.get("width"), ann.get("height")
        if (w is None or h is None) and iid in sizes:
            w, h = sizes[iid]
        if w is None or h is None:
            raise PoseError("no image width/height for this annotation", source=source, field=f"{f}.width")
        pose = pose_from_coco(ann["keypoints"], w, h, source=source, field=f"{f}.keypoints")
        bbox = ann.get("bbox")
        if bbox is not None:
            if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
                raise PoseError("bbox must be [x, y, w, h]", source=source, field=f"{f}.bbox")
            bbox = [_number(b, source=source, field=f"{f}.bbox") for b in bbox]
        people.append({"image_id": iid, "pose": pose, "bbox": bbox, "width": float(w), "height": float(h)})
    return people


def coco_person_problem(ann: Any, min_joints: int = 8, min_height: float = 64.0) -> str | None:
    """Why a COCO person annotation is not usable as a pose condition, or None when it is.

    Usable: not a crowd region (``iscrowd`` 0), at least ``min_joints`` labelled joints (v = 1 or 2), both
    shoulders and at least one hip among them (a torso to place the body by), and a bounding box at least
    ``min_height`` pixels high (smaller people's joints are labelled too coarsely to score against)."""
    if not isinstance(ann, dict) or "keypoints" not in ann:
        return "no keypoints"
    if ann.get("iscrowd", 0):
        return "crowd region"
    kps = ann["keypoints"]
    if not isinstance(kps, (list, tuple)) or len(kps) != 3 * N_JOINTS:
        return "keypoints are not 51 numbers"
    v = [kps[3 * i + 2] for i in range(N_JOINTS)]
    n = sum(1 for x in v if x in (1, 2))
    if n < min_joints:
        return f"{n} labelled joints, fewer than {min_joints}"
    J = JOINT_INDEX
    if not (v[J["shoulder_left"]] and v[J["shoulder_right"]]):
        return "a shoulder is not labelled"
    if not (v[J["hip_left"]] or v[J["hip_right"]]):
        return "no hip is labelled"
    bbox = ann.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not bbox[3] >= min_height:
        return f"bounding box lower than {min_height:g} px (or none)"
    return None


def coco_to_frame(person: dict[str, Any], margin: float = 0.1) -> Pose:
    """A COCO person mapped into the square frame by its bounding box (aspect kept), for use as a condition."""
    pose: Pose = person["pose"]
    w, h = person["width"], person["height"]
    xy = pose.xy * np.array([w, h], np.float32)  # back to pixels
    if person.get("bbox"):
        bx, by, bw, bh = person["bbox"]
    else:
        m = pose.labelled
        p = xy[m] if m.any() else np.zeros((1, 2), np.float32)
        bx, by = p.min(0)
        bw, bh = p.max(0) - p.min(0)
    span = max(bw, bh, 1e-6)
    s = (1 - 2 * margin) / span
    cx, cy = bx + bw / 2, by + bh / 2
    nxy = (xy - np.array([cx, cy], np.float32)) * s + 0.5
    nxy[pose.vis == MISSING] = 0
    return Pose(nxy, pose.vis).refresh_outside()  # OUTSIDE is re-judged against the new frame


# ---- format C: OpenPose JSON --------------------------------------------------------------------------
# OpenPose's body joints in kpnb's order (nose, eyes, ears, shoulders, elbows, wrists, hips, knees, ankles;
# "left" is the person's own left in both): COCO-18 has a neck at 1, BODY_25 a neck at 1 and a mid-hip at 8.
OPENPOSE_TO_KPNB = {
    18: [0, 15, 14, 17, 16, 5, 2, 6, 3, 7, 4, 11, 8, 12, 9, 13, 10],
    25: [0, 16, 15, 18, 17, 5, 2, 6, 3, 7, 4, 12, 9, 13, 10, 14, 11],
}


def read_openpose(obj_or_path: Any) -> list[dict[str, Any]]:
    """People of an OpenPose JSON (``{"people": [{"pose_keypoints_2d": [x, y, c, ...]}, ...]}``, COCO-18 or
    BODY_25; ControlNet pose editors add ``canvas_width``/``canvas_height``), as :func:`read_coco`'s records.
    A joint with confidence 0 is missing; the image size is the canvas when given, else the joints' extent.
    Coordinates normalised to [0, 1] (some editors write them so) are taken as fractions of a 1x1 canvas."""
    source = obj_or_path if isinstance(obj_or_path, (str, Path)) else None
    obj = _read_json(obj_or_path) if source is not None else obj_or_path
    if not isinstance(obj, dict) or not isinstance(obj.get("people"), list):
        raise PoseError("not an OpenPose file (no 'people' list)", source=source, field="people")
    out = []
    for k, person in enumerate(obj["people"]):
        f = f"people[{k}].pose_keypoints_2d"
        kps = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        if not isinstance(kps, list) or len(kps) // 3 not in OPENPOSE_TO_KPNB or len(kps) % 3:
            n = len(kps) if isinstance(kps, list) else type(kps).__name__
            raise PoseError(f"expected 54 (COCO-18) or 75 (BODY_25) numbers, got {n}", source=source, field=f)
        vals = np.array([_number(v, source=source, field=f) for v in kps], np.float64).reshape(-1, 3)
        sel = vals[OPENPOSE_TO_KPNB[len(vals)]]
        known = sel[:, 2] > 0
        w, h = obj.get("canvas_width"), obj.get("canvas_height")
        if w is None or h is None:
            small = known.any() and sel[known, :2].max() <= 1.0
            span = sel[known, :2].max(0) if known.any() else np.ones(2)
            w, h = (1.0, 1.0) if small else (float(max(span[0], 1.0)), float(max(span[1], 1.0)))
        coco = []
        for (x, y, c) in sel:
            coco += [float(x), float(y), 2 if c > 0 else 0]
        out.append({"image_id": k, "pose": pose_from_coco(coco, w, h, source=source, field=f), "bbox": None,
                    "width": float(w), "height": float(h)})
    return out


def read_pose_file(path: str | Path, *, min_joints: int = 4, person: int | None = None,
                   image_id: Any = None) -> tuple[list[tuple[str, Pose]], list[str]]:
    """The poses of a pose file, whatever its format, as ``([(label, pose in the square frame)], skipped)``:

    * the release JSON (``{"nose": [y, x], ...}`` in a 512 frame): one pose, as it is;
    * COCO keypoint annotations (a COCO file, a list of annotations, or one): each person placed into the square
      frame by its bounding box (:func:`coco_to_frame`); ``image_id`` / ``person`` (the index among the
      chosen ones) pick;
    * OpenPose JSON (COCO-18 or BODY_25): each person placed like COCO's.

    A person with fewer than ``min_joints`` labelled joints is skipped, with a message in ``skipped``. A folder
    reads every ``*.json`` in it, sorted. A file in none of the formats raises :class:`PoseError` naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        files = sorted(path.glob("*.json"))
        if not files:
            raise FileNotFoundError(f"{path}: no pose files (*.json) here")
        poses, skipped = [], []
        for f in files:
            p, s = read_pose_file(f, min_joints=min_joints, person=person, image_id=image_id)
            poses += p
            skipped += s
        return poses, skipped
    obj = _read_json(path)
    if isinstance(obj, dict) and "people" in obj:
        people, kind = read_openpose(path), "openpose"
    elif isinstance(obj, list) or (isinstance(obj, dict) and ("annotations" in obj or "keypoints" in obj)):
        people, kind = read_coco(path), "coco"  # read again by name, so that errors name the file
    elif isinstance(obj, dict) and obj and set(obj) <= set(JOINTS):
        return [(path.stem, pose_from_release(obj, source=path))], []
    else:
        raise PoseError("not a pose file: expected the release JSON ({\"nose\": [y, x], ...}), COCO keypoint "
                        "annotations or OpenPose JSON ({\"people\": [...]})", source=path)
    if image_id is not None:
        people = [p for p in people if str(p["image_id"]) == str(image_id)]
    poses, skipped = [], []
    for i, rec in enumerate(people):
        label = f"{path.stem}-{kind}{rec['image_id']}-{i}" if kind == "coco" else f"{path.stem}-person{i}"
        n = int(rec["pose"].labelled.sum())
        if n < min_joints:
            skipped.append(f"{path}: person {i} (image {rec['image_id']}) skipped: {n} labelled joints, "
                           f"fewer than {min_joints}")
            continue
        poses.append((label, coco_to_frame(rec)))
    if person is not None:
        if not 0 <= person < len(poses):
            raise PoseError(f"person {person} asked for, the file has {len(poses)} usable", source=path,
                            field="person")
        poses = [poses[person]]
    return poses, skipped
