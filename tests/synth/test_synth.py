"""The synthetic dataset: determinism, poses and rendering agree, the release layout, labels and noisy tags."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from kpnb import synth
from kpnb.data.folder import read_metadata
from kpnb.poses.formats import read_release_json
from kpnb.poses.pose import HIDDEN, JOINT_INDEX, MISSING, OUTSIDE, VISIBLE, Pose

J = JOINT_INDEX


def _label_of(index: int, seed: int = 0, frac: float = 0.4) -> str:
    """The label make_candidate will draw (its first random draw), without drawing the image."""
    return synth._sample_label(np.random.default_rng([seed, index]), frac)


def _indices_with(label: str, count: int, seed: int = 0) -> list[int]:
    out, i = [], 0
    while len(out) < count:
        if _label_of(i, seed) == label:
            out.append(i)
        i += 1
    return out


# ---- determinism ---------------------------------------------------------------------------------------
def test_make_candidate_is_deterministic_and_seed_dependent():
    a = synth.make_candidate(3, seed=5, image_size=32, render_size=64)
    b = synth.make_candidate(3, seed=5, image_size=32, render_size=64)
    c = synth.make_candidate(3, seed=6, image_size=32, render_size=64)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert a["est_pose"] == b["est_pose"] and a["meta"] == b["meta"] and a["label"] == b["label"]
    assert not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"]))
    assert a["image"].size == (32, 32) and a["image"].mode == "RGB"
    assert a["meta"]["id"] == a["label"]["id"] == str(synth.ID_BASE + 3)
    for i in range(20):   # plain JSON types (no numpy scalars) in what gets written
        c = synth.make_candidate(i, 0, 16, 32)
        assert all(type(t[k]) is str for t in c["meta"]["tags"] for k in ("id", "name", "category"))
        assert json.loads(json.dumps(c["label"])) == c["label"]


def test_first_draw_is_the_label():
    for i in range(12):
        assert synth.make_candidate(i, 0, 16, 32)["label"]["label"] == _label_of(i)


def test_every_label_kind_occurs_with_roughly_its_share():
    labels = [_label_of(i) for i in range(4000)]
    counts = {k: labels.count(k) for k in synth.LABELS}
    assert set(synth.DISTRACTOR_KINDS) <= set(synth.LABELS)
    assert all(v > 0 for v in counts.values()), counts
    assert 0.55 < counts["suitable"] / len(labels) < 0.65
    assert 0.015 < counts["rating"] / len(labels) < 0.05       # about 3 % rated explicit
    assert synth._sample_label(np.random.default_rng(0), 0.0) == "suitable"


# ---- poses ---------------------------------------------------------------------------------------------
def _cross(a: np.ndarray, b: np.ndarray) -> float:
    return float(a[0] * b[1] - a[1] * b[0])


@pytest.mark.parametrize("kind", synth.POSE_KINDS)
def test_sample_pose_kinds_and_framings(kind):
    for k, framing in enumerate(synth.FRAMINGS):
        rng = np.random.default_rng([1, k])
        pose, got = synth.sample_pose(rng, kind, facing="front", framing=framing)
        assert got == kind
        assert synth.framing_of(pose) == framing
        # the head is in the frame; a front-facing character's left shoulder and eye are on the image's right
        # when she is upright: to the right of her body's downward axis, whichever way she lies
        assert pose.in_frame[:5].sum() >= 4
        down = pose.xy[[11, 12]].mean(0) - pose.xy[[5, 6]].mean(0)
        assert _cross(pose.xy[J["shoulder_left"]] - pose.xy[J["shoulder_right"]], down) > 0
        assert _cross(pose.xy[J["eye_left"]] - pose.xy[J["eye_right"]], down) > 0
        if framing == "full_body":   # the head and legs in the frame (a hand may be cut at a side)
            assert pose.in_frame[[0, 1, 2, 11, 12, 13, 14, 15, 16]].all()
        if framing == "upper_body":
            # the hips out of the frame, with their coordinates kept
            hips = pose.xy[11:13]
            assert (pose.vis[11:13] == OUTSIDE).all() and ((hips < 0) | (hips >= 1)).any(1).all()


def test_sample_pose_is_deterministic_per_seed():
    a = [synth.sample_pose(np.random.default_rng([3, i])) for i in range(50)]
    b = [synth.sample_pose(np.random.default_rng([3, i])) for i in range(50)]
    assert all(pa == pb and ka == kb for (pa, ka), (pb, kb) in zip(a, b))
    assert a[0][0] != synth.sample_pose(np.random.default_rng([4, 0]))[0]


def test_the_wider_poses_have_their_share():
    """New kinds, tilted and bent bodies, near-side and back views and sides cut by the frame occur, as a
    minority."""
    poses, kinds = zip(*(synth.sample_pose(np.random.default_rng([5, i])) for i in range(2000)))
    kinds = np.array(kinds)
    assert set(kinds) == set(synth.POSE_KINDS)
    assert 0.12 < np.isin(kinds, synth.characters.WIDE_KINDS).mean() < 0.28
    xy = np.stack([p.xy for p in poses])
    sh, hip = xy[:, 5:7].mean(1), xy[:, 11:13].mean(1)
    up = sh - hip
    tilt = np.degrees(np.abs(np.arctan2(up[:, 0], -up[:, 1])))
    upright = ~(kinds == "lying")
    assert 0.03 < (tilt[upright] > 20).mean() < 0.2      # the narrow share leans by 3.5 degrees at most
    assert (tilt[kinds == "lying"] > 45).all()
    width = np.abs(xy[:, 5, 0] - xy[:, 6, 0]) / np.linalg.norm(up, axis=1)
    assert 0.02 < (width[upright] < 0.3).mean() < 0.2     # near the side; 3/4 views keep more than 0.4
    full = np.array([synth.framing_of(p) == "full_body" for p in poses])
    cut = np.array([not p.in_frame[5:11].all() for p in poses])
    assert 0.01 < (cut & full).mean() < 0.15              # an arm or shoulder out at a side of a full figure
    assert 0.05 < np.mean([synth.characters.seen_from_behind(p) for p in poses]) < 0.2
    lying = [p for p, k in zip(poses, kinds) if k == "lying"]
    assert all(p.xy[11:13, 1].mean() >= 0.5 for p in lying)   # turned so that her hips are low in the frame


def test_wide_share_sets_how_many_poses_come_from_the_wider_distribution(tmp_path):
    """data.wide_share: more wide poses give more figures seen from behind and of the wide kinds; the default is
    the module's share (the same draws), 0 gives none; a share outside [0, 1] is refused, naming the field."""
    def draw(**kw):
        return [synth.sample_pose(np.random.default_rng([6, i]), **kw) for i in range(1500)]
    default, same = draw(), draw(wide_share=synth.characters.WIDE_SHARE)
    assert all(pa == pb and ka == kb for (pa, ka), (pb, kb) in zip(default, same))
    behind = {w: np.mean([synth.characters.seen_from_behind(p) for p, _ in draw(wide_share=w)]) for w in (0.0, 0.8)}
    kinds = {w: np.isin([k for _, k in draw(wide_share=w)], synth.characters.WIDE_KINDS).mean() for w in (0.0, 0.8)}
    assert behind[0.0] == 0 and behind[0.8] > 0.15
    assert kinds[0.0] == 0 and kinds[0.8] > 0.3
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="wide_share"):
            synth.sample_pose(np.random.default_rng(0), wide_share=bad)
        with pytest.raises(ValueError, match="wide_share"):
            synth.write_dataset(tmp_path / "bad", 4, image_size=16, render_size=32, wide_share=bad, progress=False)
    # the share is part of a dataset's settings: another share is another dataset
    s1 = synth.write_dataset(tmp_path / "ds", 6, image_size=16, render_size=32, workers=1, progress=False)
    s2 = synth.write_dataset(tmp_path / "ds", 6, image_size=16, render_size=32, workers=1, progress=False,
                             wide_share=0.9)
    assert not s1["skipped"] and not s2["skipped"]
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["settings"]["wide_share"] == 0.9


def test_a_framing_the_pose_cannot_have_is_refused():
    refused = framed = 0
    for i in range(5000):   # a kneeling figure on her heels can have no knee or ankle below her hips
        try:
            pose, _ = synth.sample_pose(np.random.default_rng([2, i]), "kneeling", framing="cowboy_shot")
        except ValueError as e:
            assert "no cowboy_shot framing" in str(e)
            refused += 1
        else:
            assert synth.framing_of(pose) == "cowboy_shot"
            framed += 1
        if refused and framed > 100:
            break
    assert refused >= 1 and framed > 100


def test_turned_poses_hide_the_far_ear_and_shift_the_face():
    for facing, sign in (("left", -1), ("right", 1)):
        pose, _ = synth.sample_pose(np.random.default_rng(2), "standing", facing=facing, framing="full_body")
        ear_mid = pose.xy[[3, 4]].mean(0)
        assert np.sign(pose.xy[J["nose"], 0] - ear_mid[0]) == sign
        far_ear = J["ear_left"] if sign > 0 else J["ear_right"]   # turning to her own left hides her left ear
        assert pose.vis[far_ear] == HIDDEN
        # a 3/4 view has narrower shoulders than the front view
    front, _ = synth.sample_pose(np.random.default_rng(2), "standing", facing="front", framing="upper_body")
    side, _ = synth.sample_pose(np.random.default_rng(2), "standing", facing="right", framing="upper_body")
    torso = lambda p: np.linalg.norm(p.xy[[5, 6]].mean(0) - p.xy[[11, 12]].mean(0))  # noqa: E731
    width = lambda p: abs(p.xy[5, 0] - p.xy[6, 0]) / torso(p)  # noqa: E731
    assert width(side) < width(front)


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="valid kinds"):
        synth.sample_pose(np.random.default_rng(0), "flying")


# ---- rendering -----------------------------------------------------------------------------------------
def test_keypoints_sit_on_the_drawn_character():
    """Every in-frame joint of the true pose lies on a painted pixel of the character (no background)."""
    size = 128
    for k in range(24):
        rng = np.random.default_rng([9, k])
        attrs = synth.sample_attributes(rng)
        pose, kind = synth.sample_pose(rng, facing=attrs["facing"])
        attrs["seat"] = False
        img = synth.render_character(pose, attrs, size, rng, background=False)
        alpha = np.asarray(img)[..., 3]
        assert img.mode == "RGBA"
        for j in np.flatnonzero(pose.in_frame):
            x, y = (pose.xy[j] * size).astype(int)
            assert alpha[y, x] > 0, (k, kind, j)
        # and the figure does not fill the whole frame
        assert (alpha == 0).mean() > 0.05


def test_a_figure_seen_from_behind_has_no_face_and_is_tagged_so():
    """Seen from behind: the nose and eyes HIDDEN, her left shoulder on the image's left of her body's axis,
    the head painted in the hair colour where a face would show skin, tagged from_behind without eye colour."""
    found = {}
    for i in range(400):
        pose, kind = synth.sample_pose(np.random.default_rng([6, i]), "standing", framing="upper_body")
        found.setdefault(synth.characters.seen_from_behind(pose), pose)
        if len(found) == 2:
            break
    for behind, pose in found.items():
        assert (pose.vis[:3] == HIDDEN).all() == behind
        down = pose.xy[[11, 12]].mean(0) - pose.xy[[5, 6]].mean(0)
        assert (_cross(pose.xy[J["shoulder_left"]] - pose.xy[J["shoulder_right"]], down) < 0) == behind
        attrs = synth.sample_attributes(np.random.default_rng(0))
        attrs.update(hair_colour="red", skin=0, background="plain", background_colour="grey", from_behind=behind)
        img = np.asarray(synth.render_character(pose, attrs, 128)).astype(int)
        x, y = ((pose.xy[[3, 4]].mean(0) + pose.xy[J["nose"]]) / 2 * 128).astype(int)   # below the head's centre
        colour = synth.HAIR_COLOURS["red"] if behind else synth.palette.SKIN_TONES[0]
        assert np.abs(img[y, x] - colour).sum() < 30, (behind, img[y, x])
        tags = synth.tags._character_tags(attrs, "standing", "upper_body")
        assert ("from_behind" in tags) == behind and any(t.endswith("_eyes") for t in tags) != behind


def test_hair_colour_dominates_the_head_region():
    """The named hair colour is the most common colour near the top of the head (so it is learnable at 64px)."""
    for name, rgb in synth.HAIR_COLOURS.items():
        rng = np.random.default_rng(4)
        attrs = synth.sample_attributes(rng)
        attrs.update(hair_colour=name, hair_style="long", background="plain", background_colour="grey")
        pose, _ = synth.sample_pose(rng, "standing", facing="front", framing="upper_body")
        img = np.asarray(synth.render_character(pose, attrs, 64, rng)).astype(int)
        c = pose.xy[[3, 4]].mean(0) * 64
        top = img[max(0, int(c[1]) - 12):int(c[1]) - 6, int(c[0]) - 4:int(c[0]) + 4].reshape(-1, 3)
        close = (np.abs(top - np.array(rgb)).sum(1) < 40).mean()
        assert close > 0.5, (name, close)


@pytest.mark.parametrize("kind", synth.BACKGROUND_KINDS)
@pytest.mark.parametrize("diagonal", [False, True])
def test_every_background_fills_the_frame(kind, diagonal):
    attrs = synth.sample_attributes(np.random.default_rng(1))
    attrs.update(background=kind, bg_diagonal=diagonal)
    bg = synth._background(attrs, 40, 30)
    assert bg.shape == (30, 40, 3) and bg.dtype == np.uint8
    pose, _ = synth.sample_pose(np.random.default_rng(1))
    img = synth.render_character(pose, attrs, 48)
    assert img.size == (48, 48) and img.mode == "RGB"
    # light or mid tones only: the border filter looks for near-black rows
    assert bg.mean(-1).min() > 40


_xy = arrays(np.float64, (17, 2), elements=st.floats(-3, 4, allow_nan=False, width=32))
_vis = arrays(np.int8, (17,), elements=st.sampled_from([MISSING, HIDDEN, VISIBLE, OUTSIDE]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_xy, _vis, st.sampled_from(synth.HAIR_STYLES), st.booleans(), st.sampled_from(["colour", "lineart"]))
def test_render_character_never_raises(xy, vis, style, seat, ink):
    attrs = synth.sample_attributes(np.random.default_rng(0))
    attrs.update(hair_style=style, seat=seat)
    img = synth.render_character(Pose(xy, vis), attrs, 32, style=ink)
    assert img.size == (32, 32)


# ---- what the estimator wrote --------------------------------------------------------------------------
def test_suitable_keypoints_are_the_truth_with_small_jitter():
    for i in _indices_with("suitable", 6):
        c = synth.make_candidate(i, 0, 32, 64)
        true = Pose.from_array(c["label"]["true_pose"])
        est = c["est_pose"]
        assert np.abs(est.xy - true.xy).max() < 0.05
        assert np.array_equal(est.in_frame, true.in_frame)   # in-frame stays in, outside stays out
        assert (est.vis != MISSING).all() and (est.vis != HIDDEN).all()


def test_estimator_failures_differ_from_the_truth():
    for i in _indices_with("estimator_failure", 8):
        c = synth.make_candidate(i, 0, 32, 64)
        true = Pose.from_array(c["label"]["true_pose"])
        moved = np.linalg.norm(c["est_pose"].xy - true.xy, axis=1) > 0.08
        assert moved.sum() >= 5, c["label"]["attributes"].get("failure")
        assert c["label"]["suitable"] is False


def test_noisy_tags_some_distractors_lack_their_revealing_tag():
    dropped = kept = 0
    for kind in ("multiple", "scenery", "comic", "sketch", "border"):
        for i in _indices_with(kind, 10):
            c = synth.make_candidate(i, 0, 16, 48)
            names = {t["name"] for t in c["meta"]["tags"]}
            has = bool(names & set(synth.REVEALING_TAGS[kind]))
            assert has != c["label"]["revealing_tags_dropped"], (kind, names)
            dropped += not has
            kept += has
    assert 0.15 < dropped / (dropped + kept) < 0.6


def test_rating_kind_is_rated_explicit_and_others_are_not():
    for i in _indices_with("rating", 3):
        assert synth.make_candidate(i, 0, 16, 32)["meta"]["rating"] == "e"
    for i in _indices_with("suitable", 5):
        assert synth.make_candidate(i, 0, 16, 32)["meta"]["rating"] in ("g", "s", "q")


# ---- the dataset folder --------------------------------------------------------------------------------
def test_write_dataset_layout_and_rerun(tmp_path):
    out = tmp_path / "pool"
    s = synth.write_dataset(out, 40, image_size=32, render_size=64, seed=3, workers=2, progress=False)
    assert s["n"] == 40 and not s["skipped"] and sum(s["counts"].values()) == 40
    ids = [str(synth.ID_BASE + i) for i in range(40)]
    meta = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert [m["id"] for m in meta] == ids and [lab["id"] for lab in labels] == ids
    for m in meta:   # Danbooru2021-shaped: strings throughout
        assert {"id", "tags", "rating", "image_width", "image_height", "file_ext"} <= set(m)
        assert m["image_width"] == m["image_height"] == "32" and m["file_ext"] == "png"
        assert all(type(t[k]) is str for t in m["tags"] for k in ("id", "name", "category"))
        assert {t["category"] for t in m["tags"]} <= {"0", "1", "3", "4", "5"}
    assert set(read_metadata(out / "metadata.jsonl")) == set(ids)
    from PIL import Image

    for i, lab in zip(ids, labels):
        with Image.open(out / "images" / f"{i}.png") as im:
            assert im.size == (32, 32) and im.mode == "RGB"
        pose = read_release_json(out / "keypoints" / f"{i}.json")   # every image has a keypoint file
        assert (pose.vis != MISSING).all()
        assert lab["label"] in synth.LABELS and lab["suitable"] == (lab["label"] == "suitable")
        assert isinstance(lab["caption"], str) and lab["caption"]
        if lab["label"] == "scenery":
            assert lab["true_pose"] is None
        if lab["label"] == "suitable":
            true = Pose.from_array(lab["true_pose"])
            assert true.in_frame.mean() >= 0.35 and true.in_frame[:5].sum() >= 4
            assert synth.HAIR_COLOURS[lab["attributes"]["hair_colour"]]
            assert lab["attributes"]["hair_colour"] in lab["caption"]
    settings_ = json.loads((out / "dataset.json").read_text())["settings"]
    assert settings_["n"] == 40 and settings_["seed"] == 3 and settings_["version"] == synth.SYNTH_VERSION
    # same settings: nothing redone; the same content as one worker would write
    t0 = time.time()
    again = synth.write_dataset(out, 40, image_size=32, render_size=64, seed=3, workers=2, progress=False)
    assert again["skipped"] and time.time() - t0 < 2
    single = tmp_path / "single"
    synth.write_dataset(single, 40, image_size=32, render_size=64, seed=3, workers=1, progress=False)
    for i in ids[::7]:
        assert (single / "images" / f"{i}.png").read_bytes() == (out / "images" / f"{i}.png").read_bytes()
        assert (single / "keypoints" / f"{i}.json").read_text() == (out / "keypoints" / f"{i}.json").read_text()
    # fewer images with other settings: regenerated, stale files removed
    (out / "images" / f"{ids[5]}.png").unlink()
    s3 = synth.write_dataset(out, 20, image_size=32, render_size=64, seed=3, workers=1, progress=False)
    assert not s3["skipped"]
    assert len(list((out / "images").glob("*.png"))) == 20 and len(list((out / "keypoints").glob("*.json"))) == 20


def test_cli_synth(tmp_path, capsys):
    from kpnb import cli

    rc = cli.main(["synth", "--out", str(tmp_path / "d"), "--n", "5", "--size", "16", "--render-size", "32",
                   "--workers", "1", "--seed", "2", "--no-progress"])
    assert rc == 0
    assert len(list((tmp_path / "d" / "images").glob("*.png"))) == 5
    assert "5 candidates" in capsys.readouterr().out
    assert synth.main(["--out", str(tmp_path / "e"), "--n", "-1", "--no-progress"]) == 2
