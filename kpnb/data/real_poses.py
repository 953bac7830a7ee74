"""The real-pose set: COCO persons from ``data/real_poses/``, placed into the square frame."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from kpnb.core.files import atomic_write_bytes, repo_root
from kpnb.poses.formats import coco_person_problem, read_pose_dir
from kpnb.poses.pose import Pose

# ---- the real-pose evaluation set ---------------------------------------------------------------------
REAL_POSES = Path("data") / "real_poses" / "coco_persons.json"  # relative to the repository root
REAL_POSE_INFO = {
    "description": "kpnb's real-pose evaluation set: the persons of COCO 2017 person-keypoint annotations "
                   "(train2017 and val2017) usable as a pose condition (kpnb.poses.formats.coco_person_problem); "
                   "annotations only, no images",
    "source": "the subset of person_keypoints_{train,val}2017.json in https://github.com/Obmutescence/COCO-MINI "
              "(annotations/, commit a527a210ea7862caa41e35ac76851a6e42c531ad), taken from COCO 2017",
    "url": "https://cocodataset.org",
    "contributor": "COCO Consortium",
    "year": 2017,
    "licence": "the annotations: Creative Commons Attribution 4.0 (CC BY 4.0), (c) COCO Consortium; the images "
               "(not included, only named) keep their own Flickr licences",
}
REAL_POSE_LICENSES = [{"id": 1, "name": "Creative Commons Attribution 4.0 International (the annotations)",
                       "url": "https://creativecommons.org/licenses/by/4.0/"}]
_IMAGE_FIELDS = ("id", "width", "height", "file_name", "coco_url")
_ANN_FIELDS = ("id", "image_id", "keypoints", "num_keypoints", "bbox", "category_id", "iscrowd", "area")


def build_real_pose_set(sources: Iterable[str | Path], out: str | Path | None = None, *, min_joints: int = 8,
                        min_height: float = 64.0) -> dict[str, Any]:
    """The real-pose evaluation set from COCO person-keypoint files (``sources``, in order): every annotation
    :func:`kpnb.poses.formats.coco_person_problem` accepts (``min_joints``, ``min_height``), with its fields
    ``id, image_id, keypoints, num_keypoints, bbox, category_id, iscrowd, area`` (no segmentation), and the
    images they are on with ``id, width, height, file_name, coco_url`` only; ``info`` carries the source,
    the attribution and the rule. Written to ``out`` (None: :data:`REAL_POSES` in the repository) as JSON,
    and returned with ``info["counts"]`` = {source file name: [persons, usable]}."""
    images: dict[Any, dict[str, Any]] = {}
    anns: list[dict[str, Any]] = []
    counts = {}
    for src in sources:
        obj = json.loads(Path(src).read_text())
        by_id = {im["id"]: im for im in obj["images"]}
        persons = [a for a in obj["annotations"] if a.get("category_id", 1) == 1]
        usable = [a for a in persons if coco_person_problem(a, min_joints, min_height) is None]
        counts[Path(src).name] = [len(persons), len(usable)]
        for a in usable:
            anns.append({k: a[k] for k in _ANN_FIELDS})
            images.setdefault(a["image_id"], {k: by_id[a["image_id"]][k] for k in _IMAGE_FIELDS})
    info = {**REAL_POSE_INFO, "rule": {"min_joints": min_joints, "min_height": min_height,
                                       "also": "not a crowd; both shoulders and a hip labelled"},
            "counts": counts}
    coco = {"info": info, "licenses": REAL_POSE_LICENSES, "images": list(images.values()), "annotations": anns,
            "categories": [{"id": 1, "name": "person", "supercategory": "person",
                            "keypoints": ["nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder",
                                          "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
                                          "left_hip", "right_hip", "left_knee", "right_knee", "left_ankle",
                                          "right_ankle"]}]}
    path = Path(out) if out is not None else repo_root() / REAL_POSES
    path.parent.mkdir(parents=True, exist_ok=True)
    # one image or annotation a line, so that a change to the set reads as a diff
    parts = [f'"{k}": [\n' + ",\n".join(json.dumps(x) for x in v) + "\n]" if isinstance(v, list) and k != "licenses"
             else f'"{k}": {json.dumps(v)}' for k, v in coco.items()]
    atomic_write_bytes(path, ("{\n" + ",\n".join(parts) + "\n}\n").encode())
    return coco


def real_pose_set(path: str | Path | None = None) -> tuple[list[str], list[Pose]]:
    """The real-pose evaluation set (None: :data:`REAL_POSES` in the repository) as (labels, poses in the square
    frame): :func:`kpnb.poses.formats.read_pose_dir` on the COCO file, so each person is placed by its bounding box
    (:func:`kpnb.poses.formats.coco_to_frame`, margin 0.1: the box's longer side spans 80% of the frame, as a
    synthetic full-body character spans 50-93% of its height), labels ``<file stem>-coco<image id>-<index>``.

    Joints keep COCO's labels: v=2 VISIBLE, v=1 HIDDEN, v=0 MISSING (coordinates 0), and a labelled joint the
    placement puts outside the frame OUTSIDE. What each consumer makes of them:
    :func:`kpnb.evaluate.pose.pck` scores only VISIBLE joints (MISSING, HIDDEN and OUTSIDE ones never count;
    the scale is the box of the VISIBLE and HIDDEN joints), :func:`kpnb.evaluate.pose.pose_ap` scores VISIBLE
    and HIDDEN ones (COCO's own v=2 and v=1); conditioning (:mod:`kpnb.poses.conditioning`) gives a MISSING joint
    no heatmap and no limb to it in ``skeleton`` mode, the learned "missing" token without coordinates in
    ``tokens`` mode, and the cell (0, 0) in the faithful ``grid`` mode (the original had no missing joints)."""
    return read_pose_dir(path if path is not None else repo_root() / REAL_POSES)
