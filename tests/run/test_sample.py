"""kpnb sample: pose files of three formats, a run folder or a released checkpoint, deterministic output."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from kpnb.core import files, settings
from kpnb.data import subset
from kpnb.poses import analysis as pose_analysis
from kpnb.poses import formats as pose_formats
from kpnb.poses import pose as kp
from kpnb.run import sample

from helpers import exported_checkpoint

POSES = files.repo_root() / "data" / "poses"


@pytest.fixture(scope="module")
def run(tiny_ldm_run):
    return tiny_ldm_run


@pytest.fixture
def pose_files(tmp_path):
    release = tmp_path / "release.json"
    shutil.copy(POSES / "1000846.json", release)
    pose = pose_formats.read_release_json(release)
    full = pose_formats.pose_to_coco(pose, 600, 600)  # a square canvas: the same shape as the release pose
    few = [0.0] * 51
    few[0:3], few[15:18] = [100.0, 50.0, 2], [120.0, 90.0, 2]  # nose and left shoulder only
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 7, "width": 600, "height": 600}],
                                "annotations": [{"image_id": 7, "keypoints": full},
                                                {"image_id": 7, "keypoints": few}]}))
    body25 = np.zeros((25, 3))
    for j, o in enumerate(pose_formats.OPENPOSE_TO_KPNB[25]):  # kpnb joint j sits at OpenPose index o
        if pose.labelled[j]:
            body25[o] = [pose.xy[j, 0] * 512, pose.xy[j, 1] * 512, 0.9]
    body25[1] = [256, 150, 0.8]  # the neck, which kpnb has no joint for
    openpose = tmp_path / "openpose.json"
    openpose.write_text(json.dumps({"canvas_width": 512, "canvas_height": 512,
                                    "people": [{"pose_keypoints_2d": body25.ravel().tolist()}]}))
    return release, coco, openpose


def test_three_formats_from_a_run_folder_same_seed_same_images(run, pose_files, tmp_path, capsys):
    release, coco, openpose = pose_files
    args = ["--pose", str(release), "--pose", str(coco), "--pose", str(openpose), "--model", str(run),
            "--mode", "skeleton", "--n", "2", "--steps", "3", "--no-progress"]
    assert sample.main(args + ["--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    assert "person 1 (image 7) skipped: 2 labelled joints" in captured.err
    info = json.loads((tmp_path / "a" / "sample.json").read_text())
    labels = [p["label"] for p in info["poses"]]
    assert labels == ["release", "coco-coco7-0", "openpose-person0"]
    d = settings.run_config(run)["diffusion"]  # the run's sampler settings, with the given --steps
    assert info["sampler"] == {"steps": 3, "eta": d["eta"], "guidance": d["guidance"],
                               "guidance_interval": d["guidance_interval"], "solver": d["solver"]}
    assert info["model"]["model"] == "skeleton"
    assert info["model"]["ldm"]["step"] == 6 and len(info["model"]["ldm"]["sha1"]) == 16
    pngs = sorted(p.name for p in (tmp_path / "a").glob("*_[0-9].png"))
    assert pngs == sorted(f"{label}_{k}.png" for label in labels for k in (0, 1))
    assert (tmp_path / "a" / "contact_sheet.png").stat().st_size > 1000
    # the COCO and OpenPose people are the release pose in other canvases: both placed by their joints' extent
    op, _ = pose_formats.read_pose_file(openpose)
    co, _ = pose_formats.read_pose_file(coco)
    np.testing.assert_allclose(op[0][1].xy[op[0][1].labelled], co[0][1].xy[co[0][1].labelled], atol=0.02)
    assert sample.main(args + ["--out", str(tmp_path / "b")]) == 0
    for name in pngs:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_unlabelled_joints_are_completed_from_the_runs_training_poses(run, tmp_path, capsys):
    pose = pose_formats.read_release_json(POSES / "1001870.json")
    given = pose_formats.pose_to_coco(pose, 512, 512)
    for j in (0, 1, 2):                       # nose and eyes unlabelled, as COCO leaves a face it cannot see
        given[3 * j: 3 * j + 3] = [0.0, 0.0, 0]
    coco = tmp_path / "back.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "width": 512, "height": 512}],
                                "annotations": [{"image_id": 1, "keypoints": given}]}))
    args = ["--pose", str(coco), "--model", str(run), "--mode", "skeleton", "--n", "1", "--steps", "2", "--no-progress"]
    assert sample.main(args + ["--out", str(tmp_path / "c")]) == 0
    assert "3 unlabelled joints placed as the nearest training pose" in capsys.readouterr().out
    got = json.loads((tmp_path / "c" / "sample.json").read_text())["poses"][0]
    assert got["completed"] == ["nose", "eye_left", "eye_right"]
    read, _ = pose_formats.read_pose_file(coco)
    want = pose_analysis.complete_poses([read[0][1]], subset.load_subset(run, "train")["poses"])[0]
    np.testing.assert_allclose(got["pose"], want, atol=1e-5)   # the JSON records the completed pose sampled
    assert (want[:3, 2] != kp.MISSING).all()
    assert sample.main(args + ["--no-complete", "--out", str(tmp_path / "d")]) == 0
    assert json.loads((tmp_path / "d" / "sample.json").read_text())["poses"][0]["completed"] == []
    assert (tmp_path / "c" / "back-coco1-0_0.png").read_bytes() != (tmp_path / "d" / "back-coco1-0_0.png").read_bytes()


def test_bad_pose_file_is_named_with_its_field(run, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    pose = json.loads((POSES / "1000846.json").read_text())
    bad.write_text(json.dumps({**pose, "nose": "up"}))  # every joint there, one malformed
    assert sample.main(["--pose", str(bad), "--model", str(run), "--mode", "skeleton", "--out",
                        str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "'nose'" in err
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    assert sample.main(["--pose", str(other), "--model", str(run), "--out", str(tmp_path / "o")]) == 2
    assert f"{other}: not a pose file" in capsys.readouterr().err
    # a guidance interval outside the schedule is refused before anything is sampled
    assert sample.main(["--pose", str(POSES / "1000846.json"), "--model", str(run), "--mode", "skeleton",
                        "--guidance-interval", "600", "200", "--out", str(tmp_path / "g")]) == 2
    assert "guidance_interval must satisfy 0 <= lo < hi <= 1000" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_released_checkpoint_uses_the_original_scripts_defaults(pose_files, tmp_path, capsys):
    ckpt, _, _ = exported_checkpoint(tmp_path / "released.ckpt")  # kpnb's exporter, the original's layout
    release, _, _ = pose_files
    assert sample.main(["--pose", str(release), "--model", str(ckpt), "--n", "1", "--steps", "2", "--no-progress",
                        "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "the original script's defaults" in out
    assert sample.main(["--pose", str(release), "--model", str(ckpt), "--n", "1", "--steps", "3", "--no-progress",
                        "--solver", "dpmpp_2m", "--out", str(tmp_path / "m")]) == 0
    used = json.loads((tmp_path / "m" / "sample.json").read_text())["sampler"]
    assert used["solver"] == "dpmpp_2m" and used["eta"] == 0.0 and used["steps"] == 3
    info = json.loads((tmp_path / "o" / "sample.json").read_text())
    assert info["sampler"] == {"steps": 2, "eta": 1.0, "guidance": 1.0, "guidance_interval": None,
                               "solver": "ddim"}
    assert info["model"]["kind"] == "released checkpoint" and (tmp_path / "o" / "release_0.png").exists()
