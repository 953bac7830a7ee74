"""The one pose type of kpnb, its readers and writers, flip, tokenisers, drawing and plausibility features.

Inside kpnb a pose is a :class:`Pose`: 17 joints in COCO order, each with (x, y) in normalised image
coordinates (0..1, origin top-left, x to the right) and a visibility code:

* ``VISIBLE`` (2): labelled and visible
* ``HIDDEN`` (1): labelled but occluded
* ``MISSING`` (0): not labelled (coordinates are meaningless, stored as 0)
* ``OUTSIDE`` (3): labelled, but outside the image frame (coordinates kept, outside 0..1)

Every loader converts into it, every writer out of it. Two external formats are supported:

* the Danbooru pose-keypoint release: one JSON object per image, ``{"nose": [y, x], ...}`` in pixels of a
  512x512 frame. Note the **[row, col] = [y, x]** order. Values outside [0, 512) are kept and marked OUTSIDE.
* COCO person keypoints: ``[x1, y1, v1, ...]`` in image pixels with v in {0, 1, 2}.

Bad input raises :class:`PoseError`, which names the file (when known) and the field.
"""
from __future__ import annotations

import colorsys
import json
import warnings
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image, ImageDraw

JOINTS = [
    "nose", "eye_left", "eye_right", "ear_left", "ear_right",
    "shoulder_left", "shoulder_right", "elbow_left", "elbow_right",
    "wrist_left", "wrist_right", "hip_left", "hip_right",
    "knee_left", "knee_right", "ankle_left", "ankle_right",
]
N_JOINTS = len(JOINTS)
JOINT_INDEX = {name: i for i, name in enumerate(JOINTS)}
# Flip partner of each joint: "left" is the character's own left, so a mirror swaps every pair.
FLIP_PERM = [0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15]
LIMBS = [
    (4, 2), (2, 0), (0, 1), (1, 3),            # head
    (10, 8), (8, 6), (6, 5), (5, 7), (7, 9),   # arms and shoulders
    (16, 14), (14, 12), (12, 11), (11, 13), (13, 15),  # legs and hips
    (5, 11), (6, 12),                          # torso sides
]
JOINT_GROUPS = {
    "head": [0, 1, 2, 3, 4],
    "arms": [5, 6, 7, 8, 9, 10],
    "legs": [11, 12, 13, 14, 15, 16],
}

MISSING, HIDDEN, VISIBLE, OUTSIDE = 0, 1, 2, 3
VIS_NAMES = {MISSING: "missing", HIDDEN: "hidden", VISIBLE: "visible", OUTSIDE: "outside"}

RELEASE_FRAME = 512  # the release's coordinates are pixels of a 512x512 frame
GRID = 32            # the original tokeniser's grid (512 / 16)
MAX_COORD = 1e6      # pixel values beyond this are corrupt, not "outside the frame"


def _limb_side(a: int, b: int) -> str:
    names = JOINTS[a] + JOINTS[b]
    if "left" in names and "right" in names:
        return "centre"
    if "left" in names:
        return "left"
    if "right" in names:
        return "right"
    return "centre"


def _limb_colours() -> list[tuple[int, int, int]]:
    """A distinct colour per limb: warm hues for the character's left, cool for the right, greys/greens centre."""

    left = [i for i, l in enumerate(LIMBS) if _limb_side(*l) == "left"]
    right = [i for i, l in enumerate(LIMBS) if _limb_side(*l) == "right"]
    centre = [i for i, l in enumerate(LIMBS) if _limb_side(*l) == "centre"]
    out: list[tuple[int, int, int]] = [(0, 0, 0)] * len(LIMBS)
    for idx, hue0, hue1 in ((left, 0.0, 0.17), (right, 0.5, 0.75), (centre, 0.28, 0.42)):
        for k, i in enumerate(idx):
            h = hue0 + (hue1 - hue0) * k / max(1, len(idx) - 1)
            r, g, b = colorsys.hsv_to_rgb(h, 0.9, 1.0)
            out[i] = (int(r * 255), int(g * 255), int(b * 255))
    return out


LIMB_COLOURS = _limb_colours()


class PoseError(ValueError):
    """A pose could not be read: names the file (if known) and the offending field."""

    def __init__(self, message: str, *, source: str | Path | None = None, field: str | None = None):
        self.source = str(source) if source is not None else None
        self.field = field
        where = []
        if self.source:
            where.append(str(self.source))
        if field:
            where.append(f"field {field!r}")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


@dataclass
class Pose:
    """17 joints: ``xy`` float32 [17, 2] normalised (x right, y down), ``vis`` int8 [17] visibility codes."""

    xy: np.ndarray
    vis: np.ndarray

    def __post_init__(self) -> None:
        self.xy = np.asarray(self.xy, dtype=np.float32).reshape(N_JOINTS, 2)
        self.vis = np.asarray(self.vis, dtype=np.int8).reshape(N_JOINTS)
        if not np.all(np.isfinite(self.xy)):
            raise PoseError("coordinates must be finite", field="xy")
        if not np.all(np.isin(self.vis, (MISSING, HIDDEN, VISIBLE, OUTSIDE))):
            raise PoseError("visibility codes must be 0..3", field="vis")

    # ---- basic views -------------------------------------------------------------------------------
    @property
    def labelled(self) -> np.ndarray:
        """Joints with a position (visible, hidden or outside the frame)."""
        return self.vis != MISSING

    @property
    def in_frame(self) -> np.ndarray:
        """Joints labelled, inside the frame (visible or hidden)."""
        return (self.vis == VISIBLE) | (self.vis == HIDDEN)

    def copy(self) -> "Pose":
        return Pose(self.xy.copy(), self.vis.copy())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pose) and np.array_equal(self.vis, other.vis) and np.allclose(
            self.xy, other.xy, atol=1e-5)

    def to_array(self) -> np.ndarray:
        """[17, 3] float32: x, y, visibility code."""
        return np.concatenate([self.xy, self.vis[:, None].astype(np.float32)], axis=1)

    @classmethod
    def from_array(cls, arr: Any) -> "Pose":
        arr = np.asarray(arr, dtype=np.float32)
        if arr.shape != (N_JOINTS, 3):
            raise PoseError(f"expected shape (17, 3), got {arr.shape}", field="array")
        return cls(arr[:, :2], arr[:, 2].round().astype(np.int8))

    @classmethod
    def from_pixels(cls, xy_px: Any, size: float, vis: Any | None = None) -> "Pose":
        """From [17, 2] pixel (x, y) in a square frame of ``size``; visibility derived from the frame."""
        xy = np.asarray(xy_px, dtype=np.float32) / float(size)
        if vis is None:
            vis = np.full(N_JOINTS, VISIBLE, dtype=np.int8)
        vis = np.asarray(vis, dtype=np.int8).copy()
        outside = ((xy < 0) | (xy >= 1)).any(axis=1) & (vis != MISSING)
        vis[outside] = OUTSIDE
        return cls(xy, vis)

    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) over in-frame joints (all labelled joints if none are in frame)."""
        m = self.in_frame if self.in_frame.any() else self.labelled
        if not m.any():
            return (0.0, 0.0, 1.0, 1.0)
        p = self.xy[m]
        return float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max())

    def refresh_outside(self) -> "Pose":
        """Re-mark which labelled joints fall outside the 0..1 frame (after a geometric change)."""
        vis = self.vis.copy()
        out = ((self.xy < 0) | (self.xy >= 1)).any(axis=1)
        vis[(vis != MISSING) & out] = OUTSIDE
        back = (vis == OUTSIDE) & ~out
        vis[back] = VISIBLE
        return Pose(self.xy, vis)

    def affine(self, scale: float = 1.0, shift: tuple[float, float] = (0.0, 0.0)) -> "Pose":
        xy = self.xy * scale + np.asarray(shift, dtype=np.float32)
        xy[self.vis == MISSING] = 0.0
        return Pose(xy, self.vis).refresh_outside()

    def fit_to_frame(self, margin: float = 0.1) -> "Pose":
        """Scale and centre the labelled joints' bounding box into the frame (for poses from other images)."""
        m = self.labelled
        if not m.any():
            return self.copy()
        p = self.xy[m]
        lo, hi = p.min(0), p.max(0)
        span = float(max(hi - lo)) or 1.0
        s = (1 - 2 * margin) / span
        centre = (lo + hi) / 2
        return self.affine(s, tuple(0.5 - centre * s))


# ---- flip ----------------------------------------------------------------------------------------------
def flip(pose: Pose) -> Pose:
    """Mirror horizontally: x -> 1 - x and every left/right pair swapped (the character's left stays left)."""
    xy = pose.xy.copy()
    lab = pose.vis != MISSING
    xy[lab, 0] = 1.0 - xy[lab, 0]
    # A pixel at x in [0,1) maps to 1-x in (0,1]; keep the frame test consistent via refresh_outside.
    return Pose(xy[FLIP_PERM], pose.vis[FLIP_PERM]).refresh_outside()


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


# ---- the original 32x32 grid tokeniser ----------------------------------------------------------------
def grid_tokens(pose: Pose, faithful_axes: bool = True) -> np.ndarray:
    """The original training code's tokens: 17 integers in [0, 1023].

    The original (``build_tensor_from_kps``) read the release's ``[a, b]`` (= [y, x] in the 512 frame),
    floor-divided each by 16, clamped it to [0, 31] and formed ``token = a + 32 * b``. So with
    ``faithful_axes=True`` (the default, as the original) the *row* y is the fast index:
    ``token = y_cell + 32 * x_cell`` - the image axes are transposed relative to the usual row-major
    ``x + 32 * y``. ``faithful_axes=False`` gives the conventional ``x_cell + 32 * y_cell``.
    A joint's cell is the one it lies in (floor), never the nearest cell corner (rounding would move 14 of
    the 17 joints of ``data/poses/1000846.json`` by a cell). Missing joints, which the release never has,
    tokenise from (0, 0).
    """
    # float64 so that a coordinate on a cell border (e.g. 256 / 512) floors to that cell exactly
    cells = np.clip(np.floor(pose.xy.astype(np.float64) * GRID), 0, GRID - 1).astype(np.int64)
    x_cell, y_cell = cells[:, 0], cells[:, 1]
    if faithful_axes:
        return y_cell + GRID * x_cell
    return x_cell + GRID * y_cell


def grid_tokens_to_pose(tokens: Iterable[int], faithful_axes: bool = True) -> Pose:
    """Inverse of :func:`grid_tokens` up to the 16-pixel cell: each joint at the centre of its cell."""
    t = np.asarray(list(tokens), dtype=np.int64)
    fast, slow = t % GRID, t // GRID
    x_cell, y_cell = (slow, fast) if faithful_axes else (fast, slow)
    xy = (np.stack([x_cell, y_cell], 1).astype(np.float32) + 0.5) / GRID
    return Pose(xy, np.full(N_JOINTS, VISIBLE, np.int8))


# ---- drawing ------------------------------------------------------------------------------------------
def draw_skeleton(pose: Pose, size: int = 256, background: Any = None, width: int | None = None,
                  draw_hidden: bool = True) -> np.ndarray:
    """Draw the pose as coloured limbs and joints; returns uint8 [size, size, 3].

    ``background``: an image array to draw on (resized to ``size``) or None for black. Left limbs are warm,
    right limbs cool; hidden joints are drawn hollow; outside and missing joints are not drawn.
    """

    if background is None:
        img = Image.new("RGB", (size, size), (0, 0, 0))
    else:
        bg = np.asarray(background)
        if bg.dtype != np.uint8:
            bg = (np.clip(bg, 0, 1) * 255).astype(np.uint8)
        img = Image.fromarray(bg).convert("RGB").resize((size, size), Image.BILINEAR)
    d = ImageDraw.Draw(img)
    lw = width or max(1, size // 64)
    p = pose.xy * size
    show = pose.in_frame if draw_hidden else pose.vis == VISIBLE
    for (a, b), col in zip(LIMBS, LIMB_COLOURS):
        if show[a] and show[b]:
            d.line([tuple(p[a]), tuple(p[b])], fill=col, width=lw)
    r = max(1.0, lw * 0.9)
    for i in range(N_JOINTS):
        if not show[i]:
            continue
        side = "left" in JOINTS[i] and (255, 200, 0) or "right" in JOINTS[i] and (0, 200, 255) or (255, 255, 255)
        box = [p[i, 0] - r, p[i, 1] - r, p[i, 0] + r, p[i, 1] + r]
        if pose.vis[i] == HIDDEN:
            d.ellipse(box, outline=side)
        else:
            d.ellipse(box, fill=side)
    return np.asarray(img)


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


# ---- which way a figure faces --------------------------------------------------------------------------
VIEWS = ("front", "side", "back", "unknown")


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
