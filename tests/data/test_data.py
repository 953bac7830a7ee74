import json

import numpy as np
import pytest
from PIL import Image

from kpnb.core.files import repo_root
from kpnb.data import folder as data
from kpnb.data import real_poses, subset
from kpnb.poses import formats as pose_formats
from kpnb.poses import pose as kp


def _write_pose(path, seed):
    rng = np.random.default_rng(seed)
    obj = {n: [float(v) for v in rng.uniform(50, 450, 2)] for n in kp.JOINTS}
    path.write_text(json.dumps(obj))


@pytest.fixture
def messy_dataset(tmp_path):
    return make_messy_dataset(tmp_path / "ds")


def make_messy_dataset(root):
    """A dataset folder with one of each kind of bad file (also used by tests/data/test_shards.py)."""
    (root / "images").mkdir(parents=True)
    (root / "keypoints").mkdir()
    for i in range(6):
        Image.fromarray(np.full((40, 30, 3), i * 40, np.uint8)).save(root / "images" / f"{i}.png")
        _write_pose(root / "keypoints" / f"{i}.json", i)
    # corrupt image: random bytes with a png name
    (root / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    # truncated image
    good = (root / "images" / "2.png").read_bytes()
    (root / "images" / "2.png").write_bytes(good[: len(good) // 2])
    # invalid keypoints: a missing joint, and not JSON at all
    obj = json.loads((root / "keypoints" / "3.json").read_text())
    del obj["ankle_left"]
    (root / "keypoints" / "3.json").write_text(json.dumps(obj))
    (root / "keypoints" / "4.json").write_text("{oops")
    # image without keypoints, keypoints without image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / "9.png")
    _write_pose(root / "keypoints" / "77.json", 77)
    (root / "metadata.jsonl").write_text(
        json.dumps({"id": "0", "tags": [{"id": "1", "name": "1girl", "category": "0"}], "rating": "s"}) + "\n"
        + "not json\n"
        + json.dumps({"id": 5, "tag_string": "solo red_hair", "rating": "g"}) + "\n")
    return root


def test_corrupt_files_are_reported_and_skipped(messy_dataset):
    c = data.load_candidates(messy_dataset, 16, progress=False)
    assert c.ids == ["0", "5"]
    assert c.images.shape == (2, 16, 16, 3) and c.poses.shape == (2, 17, 3)
    p = c.problems
    assert [f.split("/")[-1] for f, _ in p.bad_images] == ["1.png", "2.png"]
    assert sorted(f.split("/")[-1] for f, _ in p.bad_keypoints) == ["3.json", "4.json"]
    assert any("ankle_left" in why for _, why in p.bad_keypoints)
    assert [f.split("/")[-1] for f in p.no_keypoints] == ["9.png"]
    assert [f.split("/")[-1] for f in p.no_image] == ["77.json"]
    assert len(p.bad_metadata_lines) == 1
    assert c.meta[0]["tag_names"] == ["1girl"] and c.meta[1]["tag_names"] == ["solo", "red_hair"]
    assert "bad_images: 2" in p.summary()


def test_not_a_dataset_folder(tmp_path):
    with pytest.raises(data.DataError, match="images/ and keypoints/"):
        data.load_candidates(tmp_path, 16)


def test_load_image_errors_name_file(tmp_path):
    f = tmp_path / "x.jpg"
    f.write_bytes(b"nope")
    with pytest.raises(data.DataError, match="x.jpg"):
        data.load_image(f)


def test_split_is_stable_and_proportional():
    ids = [str(i) for i in range(4000)]
    s = [data.split_of(i, 0.1) for i in ids]
    assert 0.08 < s.count("val") / len(s) < 0.12
    assert s == [data.split_of(i, 0.1) for i in reversed(ids)][::-1]


def test_subset_round_trip_no_pickle(tmp_path):
    ims = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)
    poses = np.random.default_rng(1).random((3, 17, 3)).astype(np.float32)
    subset.save_subset(tmp_path, "train", ids=["a", "b", "c"], images=ims, poses=poses,
                     captions=["x", "y", "z"], attrs=[{"hair_colour": "red"}, {}, {}])
    s = subset.load_subset(tmp_path, "train")
    assert list(s["ids"]) == ["a", "b", "c"] and np.array_equal(s["images"], ims)
    assert s["attrs"][0]["hair_colour"] == "red"
    with pytest.raises(data.DataError, match="notebook 01"):
        subset.load_subset(tmp_path, "val")


def test_flip_images_mirrors_width():
    # poses are flipped by kpnb.poses.conditioning.flip_poses (tested there against kpnb.poses.pose.flip)
    ims = np.random.default_rng(2).integers(0, 255, (2, 4, 5, 3)).astype(np.uint8)
    assert np.array_equal(data.flip_images(ims)[:, :, 0], ims[:, :, -1])


# ---- the real-pose evaluation set ---------------------------------------------------------------------
def _person(n_labelled=17, *, crowd=0, height=100.0, drop=(), v=2, ann_id=1, image_id=1):
    """A COCO person annotation: joint j at (20 + 3j, 30 + 4j), the first ``n_labelled`` joints labelled (v),
    the joints in ``drop`` not labelled."""
    kps = []
    for j in range(17):
        lab = j < n_labelled and j not in drop
        kps += [20.0 + 3 * j, 30.0 + 4 * j, v] if lab else [0, 0, 0]
    return {"id": ann_id, "image_id": image_id, "keypoints": kps, "num_keypoints": sum(k > 0 for k in kps[2::3]),
            "bbox": [15.0, 25.0, 60.0, height], "category_id": 1, "iscrowd": crowd, "area": 60.0 * height,
            "segmentation": [[0, 0, 1, 1]]}


def test_the_rule_refuses_each_kind_of_unusable_person():
    assert pose_formats.coco_person_problem(_person()) is None
    assert pose_formats.coco_person_problem(_person(v=1)) is None                    # hidden joints are labelled
    assert "crowd" in pose_formats.coco_person_problem(_person(crowd=1))
    assert "fewer than 8" in pose_formats.coco_person_problem(_person(17, drop=range(7, 17)))   # 7 labelled
    assert pose_formats.coco_person_problem(_person(17, drop=range(8, 11))) is None  # 14 labelled
    assert "shoulder" in pose_formats.coco_person_problem(_person(drop=(6,)))
    assert "hip" in pose_formats.coco_person_problem(_person(drop=(11, 12)))
    assert pose_formats.coco_person_problem(_person(drop=(11,))) is None             # one hip is enough
    assert "64 px" in pose_formats.coco_person_problem(_person(height=63.0))
    assert pose_formats.coco_person_problem(_person(height=64.0)) is None


def test_build_keeps_the_usable_people_and_only_the_listed_fields(tmp_path):
    images = [{"id": i, "width": 200, "height": 300, "file_name": f"{i}.jpg", "coco_url": f"http://x/{i}.jpg",
               "license": 3, "flickr_url": "http://f", "date_captured": "d"} for i in (1, 2, 3)]
    anns = [_person(ann_id=10, image_id=1), _person(ann_id=11, image_id=1, crowd=1),
            _person(ann_id=12, image_id=2, height=40.0), _person(ann_id=13, image_id=3, drop=(5,)),
            _person(ann_id=14, image_id=3)]
    src = tmp_path / "person_keypoints_x.json"
    src.write_text(json.dumps({"images": images, "annotations": anns}))
    out = real_poses.build_real_pose_set([src], tmp_path / "set.json")
    assert [a["id"] for a in out["annotations"]] == [10, 14]
    assert [im["id"] for im in out["images"]] == [1, 3]
    assert set(out["images"][0]) == {"id", "width", "height", "file_name", "coco_url"}
    assert "segmentation" not in out["annotations"][0] and out["info"]["counts"] == {src.name: [5, 2]}
    assert json.loads((tmp_path / "set.json").read_text()) == out
    labels, poses = real_poses.real_pose_set(tmp_path / "set.json")
    assert len(poses) == 2 and labels[0].startswith("set-coco1-")


def test_the_committed_real_pose_set_obeys_its_rule():
    obj = json.loads((repo_root() / real_poses.REAL_POSES).read_text())
    anns, images = obj["annotations"], obj["images"]
    assert len(anns) == sum(kept for _, kept in obj["info"]["counts"].values()) == 78
    rule = obj["info"]["rule"]
    for a in anns:
        assert pose_formats.coco_person_problem(a, rule["min_joints"], rule["min_height"]) is None, a["id"]
        assert pose_formats.coco_person_problem(a) is None, a["id"]  # the file's rule is the default one
        assert set(a) == {"id", "image_id", "keypoints", "num_keypoints", "bbox", "category_id", "iscrowd", "area"}
        assert a["num_keypoints"] == sum(v > 0 for v in a["keypoints"][2::3])
    assert len({a["id"] for a in anns}) == len(anns)
    assert all(set(im) == {"id", "width", "height", "file_name", "coco_url"} for im in images)
    assert {a["image_id"] for a in anns} == {im["id"] for im in images}   # no image without a person
    assert "CC BY 4.0" in obj["info"]["licence"] and obj["info"]["contributor"] == "COCO Consortium"
    assert "creativecommons.org/licenses/by/4.0" in obj["licenses"][0]["url"]


def test_real_poses_keep_their_geometry_and_missing_joints_stay_missing():
    path = repo_root() / real_poses.REAL_POSES
    raw = json.loads(path.read_text())
    sizes = {im["id"]: (im["width"], im["height"]) for im in raw["images"]}
    labels, poses = real_poses.real_pose_set()
    assert len(poses) == len(raw["annotations"]) == len(labels)
    n_missing = 0
    for ann, pose in zip(raw["annotations"], poses):
        k = np.array(ann["keypoints"], np.float64).reshape(17, 3)
        lab = k[:, 2] > 0
        assert np.array_equal(pose.vis == kp.MISSING, ~lab)               # v=0 -> MISSING, nothing else
        assert np.all(np.isin(pose.vis[k[:, 2] == 1], (kp.HIDDEN, kp.OUTSIDE)))   # OUTSIDE: placed off the frame
        assert np.all(np.isin(pose.vis[k[:, 2] == 2], (kp.VISIBLE, kp.OUTSIDE)))
        assert np.array_equal(pose.vis == kp.OUTSIDE, lab & ((pose.xy < 0) | (pose.xy >= 1)).any(1))
        n_missing += int((~lab).sum())
        # one scale and one shift map the image's pixels into the frame: the joints' relative geometry is kept
        px, fr = k[lab, :2], pose.xy[lab].astype(np.float64)
        d_px = np.linalg.norm(px[:, None] - px[None], axis=-1)
        d_fr = np.linalg.norm(fr[:, None] - fr[None], axis=-1)
        far = d_px > 1
        s = (d_fr[far] / d_px[far])
        np.testing.assert_allclose(s, s.mean(), rtol=1e-4)
        shift = fr - px * s.mean()                                       # the same for every joint: no rotation
        np.testing.assert_allclose(shift, np.broadcast_to(shift.mean(0), shift.shape), atol=1e-4)
        # the box's longer side spans 80% of the frame, its centre at the frame's
        bx, by, bw, bh = ann["bbox"]
        assert s.mean() * max(bw, bh) == pytest.approx(0.8, rel=1e-4)
        np.testing.assert_allclose((np.array([bx + bw / 2, by + bh / 2]) - px[0]) * s.mean() + fr[0], 0.5, atol=1e-4)
        assert ann["image_id"] in sizes
    assert n_missing > 0  # the set does have missing joints to keep missing
