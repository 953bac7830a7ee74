import json

import numpy as np
import pytest
from PIL import Image

from kpnb import data, keypoints as kp


def _write_pose(path, seed):
    rng = np.random.default_rng(seed)
    obj = {n: [float(v) for v in rng.uniform(50, 450, 2)] for n in kp.JOINTS}
    path.write_text(json.dumps(obj))


@pytest.fixture
def messy_dataset(tmp_path):
    return make_messy_dataset(tmp_path / "ds")


def make_messy_dataset(root):
    """A dataset folder with one of each kind of bad file (also used by tests/test_shards.py)."""
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
    data.save_subset(tmp_path, "train", ids=["a", "b", "c"], images=ims, poses=poses,
                     captions=["x", "y", "z"], attrs=[{"hair_colour": "red"}, {}, {}])
    s = data.load_subset(tmp_path, "train")
    assert list(s["ids"]) == ["a", "b", "c"] and np.array_equal(s["images"], ims)
    assert s["attrs"][0]["hair_colour"] == "red"
    with pytest.raises(data.DataError, match="notebook 01"):
        data.load_subset(tmp_path, "val")


def test_flip_images_mirrors_width():
    # poses are flipped by kpnb.conditioning.flip_poses (tested there against kpnb.keypoints.flip)
    ims = np.random.default_rng(2).integers(0, 255, (2, 4, 5, 3)).astype(np.uint8)
    assert np.array_equal(data.flip_images(ims)[:, :, 0], ims[:, :, -1])
