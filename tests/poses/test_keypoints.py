from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kpnb.poses import analysis as pose_analysis
from kpnb.poses import formats as pose_formats
from kpnb.poses import pose as kp

POSES = Path(__file__).resolve().parents[2] / "data" / "poses"

ROOT = Path(__file__).resolve().parents[2]


def _pose(seed=0, n_outside=0):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0.05, 0.95, (17, 2)).astype(np.float32)
    vis = np.full(17, kp.VISIBLE, np.int8)
    for j in range(n_outside):
        xy[16 - j, 1] = 1.2 + 0.1 * j
        vis[16 - j] = kp.OUTSIDE
    return kp.Pose(xy, vis)


def test_example_poses_load():
    files = sorted((ROOT / "data" / "poses").glob("*.json"))
    assert len(files) == 2
    for f in files:
        pose = pose_formats.read_release_json(f)
        assert pose.xy.shape == (17, 2)
        assert pose.in_frame.sum() >= 10
    # 1000846: knee_left is stored as [533.2, 245.2] -> y = 533.2 is below the 512 frame
    p = pose_formats.read_release_json(ROOT / "data" / "poses" / "1000846.json")
    j = kp.JOINT_INDEX["knee_left"]
    assert p.vis[j] == kp.OUTSIDE
    assert p.xy[j, 1] == pytest.approx(533.2 / 512, rel=1e-5)  # kept, not clamped
    assert p.xy[j, 0] == pytest.approx(245.2 / 512, rel=1e-5)


def test_release_axis_order():
    obj = {n: [10.0, 300.0] for n in kp.JOINTS}  # [y, x]
    obj["nose"] = [100.0, 400.0]
    p = pose_formats.pose_from_release(obj)
    assert p.xy[0, 0] == pytest.approx(400 / 512)  # x from the second value
    assert p.xy[0, 1] == pytest.approx(100 / 512)  # y from the first value
    assert pose_formats.pose_to_release(p)["nose"] == pytest.approx([100.0, 400.0])


def test_release_round_trip_with_outside(tmp_path):
    p = _pose(1, n_outside=3)
    path = tmp_path / "p.json"
    pose_formats.write_release_json(p, path)
    q = pose_formats.read_release_json(path)
    assert q == p
    assert (q.vis == kp.OUTSIDE).sum() == 3


def test_negative_values_are_outside():
    obj = {n: [100.0, 100.0] for n in kp.JOINTS}
    obj["wrist_left"] = [-20.0, 50.0]
    p = pose_formats.pose_from_release(obj)
    assert p.vis[kp.JOINT_INDEX["wrist_left"]] == kp.OUTSIDE
    assert p.xy[kp.JOINT_INDEX["wrist_left"], 1] < 0


@pytest.mark.parametrize("bad, field", [
    ({"nose": [1, 2]}, "eye_left"),
    ("not a dict", None),
])
def test_release_errors_name_field(bad, field):
    with pytest.raises(kp.PoseError) as e:
        pose_formats.pose_from_release(bad, source="x.json")
    assert "x.json" in str(e.value)
    if field:
        assert field in str(e.value)


def test_release_errors_nan_and_types():
    base = {n: [1.0, 2.0] for n in kp.JOINTS}
    for bad in ([float("nan"), 1.0], ["a", 1.0], [1.0], [True, 2.0], None, [1.0, float("inf")]):
        obj = dict(base, elbow_right=bad)
        with pytest.raises(kp.PoseError, match="elbow_right"):
            pose_formats.pose_from_release(obj, source="f.json")


def test_read_release_bad_file(tmp_path):
    f = tmp_path / "broken.json"
    f.write_text("{not json")
    with pytest.raises(kp.PoseError, match="broken.json"):
        pose_formats.read_release_json(f)
    with pytest.raises(kp.PoseError, match="missing.json"):
        pose_formats.read_release_json(tmp_path / "missing.json")


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True, allow_infinity=True) | st.integers() | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=30,
)
joint_value = st.one_of(
    st.lists(st.floats(allow_nan=True, allow_infinity=True) | st.integers(-10**6, 10**6), min_size=0, max_size=3),
    json_values)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({n: joint_value for n in kp.JOINTS})))
def test_reader_never_raises_anything_else(obj):
    try:
        pose = pose_formats.pose_from_release(obj, source="h.json")
    except kp.PoseError as e:
        assert "h.json" in str(e)
    else:
        assert np.isfinite(pose.xy).all()


def test_coco_one_and_many_people():
    kps = []
    for j in range(17):
        kps += [10.0 + j, 20.0 + j, 2]
    kps[3 * 5 + 2] = 1           # shoulder_left hidden
    kps[3 * 9:3 * 9 + 3] = [0, 0, 0]  # wrist_left missing
    coco = {"images": [{"id": 7, "width": 200, "height": 100}],
            "annotations": [{"image_id": 7, "keypoints": kps, "bbox": [10, 20, 16, 16]},
                            {"image_id": 7, "keypoints": [x * 2 if k % 3 != 2 else x for k, x in enumerate(kps)]}]}
    people = pose_formats.read_coco(coco)
    assert len(people) == 2
    p = people[0]["pose"]
    assert p.xy[0, 0] == pytest.approx(10 / 200) and p.xy[0, 1] == pytest.approx(20 / 100)
    assert p.vis[5] == kp.HIDDEN and p.vis[9] == kp.MISSING and p.vis[0] == kp.VISIBLE
    # round trip
    back = pose_formats.pose_to_coco(p, 200, 100)
    assert back == pytest.approx([float(v) for v in kps])
    # mapped into the frame by its bbox: centred, in frame
    f = pose_formats.coco_to_frame(people[0])
    assert f.in_frame[f.labelled].all()
    assert np.allclose(f.xy[f.labelled].mean(0), 0.5, atol=0.2)


def test_coco_errors():
    with pytest.raises(kp.PoseError, match="51"):
        pose_formats.pose_from_coco([1, 2, 3], 10, 10)
    with pytest.raises(kp.PoseError, match="positive"):
        pose_formats.pose_from_coco([0] * 51, -5, 10)
    with pytest.raises(kp.PoseError, match="visibility"):
        pose_formats.pose_from_coco([1, 1, 7] + [0] * 48, 10, 10)
    with pytest.raises(kp.PoseError, match="width"):
        pose_formats.read_coco([{"keypoints": [0] * 51}])


def test_coco_outside_round_trip():
    p = _pose(3, n_outside=2)
    q = pose_formats.pose_from_coco(pose_formats.pose_to_coco(p, 64, 64), 64, 64)
    assert q == p


def test_flip_swaps_left_right():
    p = _pose(4)
    f = kp.flip(p)
    L, R = kp.JOINT_INDEX["wrist_left"], kp.JOINT_INDEX["wrist_right"]
    assert f.xy[L, 0] == pytest.approx(1 - p.xy[R, 0])
    assert f.xy[L, 1] == pytest.approx(p.xy[R, 1])
    assert f.xy[0, 0] == pytest.approx(1 - p.xy[0, 0])
    assert kp.flip(f) == p
    assert sorted(kp.FLIP_PERM) == list(range(17))
    for i, j in enumerate(kp.FLIP_PERM):
        a, b = kp.JOINTS[i], kp.JOINTS[j]
        assert a.replace("left", "X").replace("right", "left").replace("X", "right") == b


def test_grid_tokens_hand_computed():
    # the original: a // 16 and b // 16 of the release's [a, b] (= [y, x]), clamped to [0, 31], a + 32 * b
    obj = {n: [0.0, 0.0] for n in kp.JOINTS}
    obj["nose"] = [100.0, 200.0]      # y=100 -> 6.25 -> 6 ; x=200 -> 12.5 -> 12
    obj["eye_left"] = [600.0, -40.0]  # clamped: y -> 31, x -> -3 -> 0
    obj["eye_right"] = [31.9, 47.9]   # 1.99 -> 1 ; 2.99 -> 2 (floor, not nearest)
    obj["ear_left"] = [256.0, 15.99]  # on a cell border: 16 ; 0.999 -> 0
    p = pose_formats.pose_from_release(obj)
    t = kp.grid_tokens(p)
    assert t[0] == 6 + 32 * 12        # faithful: row (y) is the fast index
    assert t[1] == 31 + 32 * 0
    assert t[2] == 1 + 32 * 2
    assert t[3] == 16 + 32 * 0
    assert t[4] == 0
    tc = kp.grid_tokens(p, faithful_axes=False)
    assert tc[0] == 12 + 32 * 6
    assert t.min() >= 0 and t.max() <= 1023
    back = kp.grid_tokens_to_pose(t)
    assert back.xy[0, 0] == pytest.approx(12.5 / 32) and back.xy[0, 1] == pytest.approx(6.5 / 32)
    assert np.array_equal(kp.grid_tokens(back), t)


# Worked by hand from the two example poses' JSON, joint by joint, as a // 16 + 32 * (b // 16).
# 1000846: nose [93.2, 205.6] -> 5 + 32*12 = 389; knee_left [533.2, 245.2] -> 33 clamped 31 + 32*15 = 511;
# elbow_left [256.0, 315.6] -> 16 + 32*19 = 624. 1001870: nose [194.1, 252.8] -> 12 + 32*15 = 492;
# shoulder_left [312.5, 350.0] -> 19 + 32*21 = 691; ankle_left [460.5, 185.1] -> 28 + 32*11 = 380.
EXAMPLE_TOKENS = {
    "1000846": [389, 484, 389, 517, 389, 554, 426, 624, 367, 499, 371, 502, 406, 511, 478, 534, 479],
    "1001870": [492, 586, 459, 652, 427, 691, 465, 633, 633, 348, 376, 570, 539, 635, 603, 380, 380],
}


@pytest.mark.parametrize("pose_id", sorted(EXAMPLE_TOKENS))
def test_grid_tokens_of_the_example_poses(pose_id):
    (_, pose), = pose_formats.read_pose_file(POSES / f"{pose_id}.json")[0]
    assert kp.grid_tokens(pose).tolist() == EXAMPLE_TOKENS[pose_id]


def test_draw_skeleton_colours_sides():
    p = _pose(5)
    img = kp.draw_skeleton(p, 128)
    assert img.shape == (128, 128, 3) and img.dtype == np.uint8
    assert img.sum() > 0
    left = [i for i, l in enumerate(kp.LIMBS) if kp._limb_side(*l) == "left"]
    right = [i for i, l in enumerate(kp.LIMBS) if kp._limb_side(*l) == "right"]
    assert len(set(kp.LIMB_COLOURS)) == len(kp.LIMBS)  # one distinct colour per limb
    assert all(kp.LIMB_COLOURS[i][0] > kp.LIMB_COLOURS[i][2] for i in left)   # warm
    assert all(kp.LIMB_COLOURS[i][2] > kp.LIMB_COLOURS[i][0] for i in right)  # cool


def test_plausibility_features_detect_scramble():
    p = pose_formats.read_release_json(ROOT / "data" / "poses" / "1001870.json")
    f = pose_analysis.plausibility_features(p)
    assert 0 <= f["frac_in_frame"] <= 1
    assert f["lr_consistency"] == 1.0
    s = p.copy()
    perm = list(range(17))
    perm[11], perm[12] = 12, 11  # only the hips swapped: their left/right order disagrees with the shoulders'
    s.xy = s.xy[perm]
    g = pose_analysis.plausibility_features(s)
    assert g["lr_consistency"] < 1.0
    assert f["hip_mid_y"] == pytest.approx((p.xy[11, 1] + p.xy[12, 1]) / 2)


def test_nearest_poses_fits_scale_and_shift_over_labelled_joints():
    p = pose_formats.read_release_json(ROOT / "data" / "poses" / "1001870.json")
    others = [_pose(s) for s in range(5)]
    moved = p.xy * 0.5 + [0.2, 0.1]               # the same pose, smaller and shifted
    ref = np.stack([o.to_array() for o in others[:2]] + [kp.Pose(moved, p.vis).to_array()] +
                   [o.to_array() for o in others[2:]])
    nn = pose_analysis.nearest_poses([p], ref)
    assert nn["index"][0] == 2 and nn["distance"][0] == pytest.approx(0, abs=1e-5) and nn["pck"][0] == 1.0
    # a tilt is a difference (no rotation is fitted); a joint missing in the pose does not count
    t = np.radians(20)
    tilted = (p.xy - 0.5) @ np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]).T + 0.5
    assert pose_analysis.nearest_poses([p], [kp.Pose(tilted, p.vis)])["distance"][0] > 0.02
    q = p.copy()
    q.vis[9] = kp.MISSING
    off = ref.copy()
    off[2, 9, :2] += 0.3                           # the reference's wrist far off: only q ignores it
    assert pose_analysis.nearest_poses([q], off)["pck"][0] == 1.0
    assert pose_analysis.nearest_poses([p], off)["pck"][0] < 1.0
    empty = kp.Pose(np.zeros((17, 2)), np.zeros(17))
    assert nn["index"].dtype.kind == "i" and pose_analysis.nearest_poses([empty], ref)["index"][0] == -1


def test_complete_poses_fills_unlabelled_joints_from_the_nearest_reference():
    p = pose_formats.read_release_json(ROOT / "data" / "poses" / "1001870.json")
    ref_pose = p.copy()
    ref_pose.vis[[0, 1, 2]] = kp.HIDDEN                 # the reference marks nose and eyes hidden (a back view)
    ref_pose.xy[16] = (0.5, 1.3)
    ref_pose.vis[16] = kp.OUTSIDE                       # and its left ankle below the frame
    moved = kp.Pose(ref_pose.xy * 0.5 + [0.2, 0.1], ref_pose.vis)   # the same pose, smaller and shifted
    ref = np.stack([_pose(1).to_array(), moved.to_array(), _pose(2).to_array()])
    q = p.to_array()
    q[[0, 1, 2, 16], :2], q[[0, 1, 2, 16], 2] = 0, kp.MISSING         # as COCO leaves them: unlabelled
    q[9, 2] = kp.HIDDEN
    out = pose_analysis.complete_poses([q], ref)[0]
    np.testing.assert_array_equal(out[[0, 1, 2], 2], kp.HIDDEN)      # the reference's codes, at its fitted places
    np.testing.assert_allclose(out[[0, 1, 2], :2], p.xy[[0, 1, 2]], atol=1e-5)
    assert out[16, 2] == kp.OUTSIDE and out[16, 1] > 1              # placed below the frame: OUTSIDE
    keep = [j for j in range(17) if j not in (0, 1, 2, 16)]
    np.testing.assert_array_equal(out[keep], q[keep])               # labelled joints as they were (9 still hidden)
    full = p.to_array()
    np.testing.assert_array_equal(pose_analysis.complete_poses([full], ref)[0], full)   # nothing to fill
    with pytest.raises(ValueError, match="reference"):
        pose_analysis.complete_poses([q], np.zeros((0, 17, 3)))


def test_read_pose_dir_reads_sorted_and_names_bad_files(tmp_path):
    from kpnb.poses import formats as pose_formats
    from kpnb.poses import pose as kp
    from kpnb.run import figures

    pose = pose_formats.read_release_json(sorted(Path("data/poses").glob("*.json"))[0])
    for name in ("b", "a"):
        pose_formats.write_release_json(pose, tmp_path / f"{name}.json")
    labels, poses = pose_formats.read_pose_dir(tmp_path)
    assert labels == ["a", "b"] and poses[0] == pose
    fig = figures.pose_sample_grid(poses, np.zeros((4, 32, 32, 3), np.uint8), np.stack([p.to_array() for p in poses
                                   for _ in range(2)]), 2, path=tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0 and fig is not None
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(kp.PoseError, match="c.json"):
        pose_formats.read_pose_dir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        pose_formats.read_pose_dir(tmp_path / "empty")


def test_openpose_joint_maps_follow_openposes_documented_order():
    """OpenPose COCO-18: 0 Nose 1 Neck 2 RShoulder 3 RElbow 4 RWrist 5 LShoulder 6 LElbow 7 LWrist 8 RHip 9 RKnee
    10 RAnkle 11 LHip 12 LKnee 13 LAnkle 14 REye 15 LEye 16 REar 17 LEar; BODY_25 inserts MidHip at 8 (so the
    hips, knees and ankles move up by one) and adds the feet at 19-24."""
    from kpnb.poses import formats as pose_formats
    from kpnb.poses import pose as kp

    named = {18: {"nose": 0, "eye_left": 15, "ear_right": 16, "shoulder_left": 5, "wrist_right": 4, "hip_right": 8,
                  "ankle_left": 13},
             25: {"nose": 0, "eye_left": 16, "ear_right": 17, "shoulder_left": 5, "wrist_right": 4, "hip_right": 9,
                  "ankle_left": 14}}
    for n, want in named.items():
        for joint, index in want.items():
            assert pose_formats.OPENPOSE_TO_KPNB[n][kp.JOINT_INDEX[joint]] == index, (n, joint)
        kps = []
        for i in range(n):  # joint i at x = 10 i + 5; the neck left out (confidence 0)
            kps += [10.0 * i + 5, 100.0, 0.0 if i == 1 else 0.9]
        people = pose_formats.read_openpose({"canvas_width": 400, "canvas_height": 400, "people": [{"pose_keypoints_2d": kps}]})
        pose = people[0]["pose"]
        for joint, index in want.items():
            assert pose.xy[kp.JOINT_INDEX[joint], 0] == pytest.approx((10 * index + 5) / 400)
    with pytest.raises(kp.PoseError, match="54 .COCO-18. or 75"):
        pose_formats.read_openpose({"people": [{"pose_keypoints_2d": [1, 2, 3]}]})


def test_pose_views_reads_the_view_from_the_shoulders_as_the_synthetic_truth_has_it():
    from kpnb import synth
    rng = np.random.default_rng(0)
    poses = [synth.characters.sample_pose(rng)[0] for _ in range(600)]
    behind = np.array([synth.characters.seen_from_behind(p) for p in poses])
    views = pose_analysis.pose_views(poses)
    assert set(views) <= set(kp.VIEWS) and 0.05 < behind.mean() < 0.2
    assert (views[behind] == "back").mean() > 0.8 and (views[~behind] == "back").mean() == 0
    assert (views[~behind] == "front").mean() > 0.85
    # a mirror image is seen from the same side: flip swaps the labels with the places
    assert (pose_analysis.pose_views([kp.flip(p) for p in poses]) == views).all()
    a = poses[0].to_array()
    a[:, 2] = kp.VISIBLE
    a[[5, 6, 11, 12], :2] = [[0.6, 0.3], [0.4, 0.3], [0.58, 0.6], [0.42, 0.6]]   # left shoulder on the image's right
    side, back, unknown = a.copy(), a.copy(), a.copy()
    side[[5, 6], 0] = [0.52, 0.48]
    back[[5, 6], 0] = [0.4, 0.6]
    unknown[11, 2] = kp.MISSING
    assert list(pose_analysis.pose_views([a, side, back, unknown])) == ["front", "side", "back", "unknown"]
