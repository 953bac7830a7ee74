"""What notebook 08 draws from (kpnb.run.blog_figures): a run's generators, their samples, the pool's keypoint
files; on the tiny diffusion run of conftest.py."""
import shutil

import numpy as np

from kpnb.core import files as core_files
from kpnb.core.settings import run_config
from kpnb.diffusion import sampling
from kpnb.poses.formats import write_release_json
from kpnb.poses.pose import VISIBLE, Pose
from kpnb.run import blog_figures as B
from kpnb.run import folder as runs
from kpnb.run.folder import RunFiles
from kpnb.train.ldm import load_ldm
from kpnb.train.vq import load_vq


def test_a_run_without_generators_has_no_systems(tmp_path):
    runs.run_dir(tmp_path, "smoke")
    assert B.systems_of_run(RunFiles(tmp_path), "f16") == {}


def test_the_best_diffusion_model_is_a_system_and_samples_with_the_preset(tiny_ldm_run, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(tiny_ldm_run, root)
    core_files.write_metrics(root, "04_ldm_training", {"best_mode": "skeleton"}, preset="smoke", seconds=1.0)
    files = RunFiles(root)
    systems = B.systems_of_run(files, "f16")
    assert systems == {"diffusion f4 (skeleton)": B.System("ldm", files.ldm("f4", "skeleton"), "f4")}
    p = np.zeros((2, 17, 3), np.float32)
    p[..., :2], p[..., 2] = 0.5, VISIBLE
    cfg = run_config(root)
    images = B.sample_system(systems["diffusion f4 (skeleton)"], files, p, cfg)
    want = sampling.sample_images(load_ldm(files.ldm("f4", "skeleton")), load_vq(files.vq("f4")), p, seed=0,
                                  **sampling.sample_kwargs(cfg["diffusion"]))
    np.testing.assert_array_equal(images, want)


def test_keypoint_folder_poses_leave_out_files_that_are_no_pose(tmp_path):
    rng = np.random.default_rng(0)
    arrays = []
    for name in ("b", "a"):
        a = np.zeros((17, 3), np.float32)
        a[:, :2], a[:, 2] = rng.uniform(0.1, 0.9, (17, 2)), VISIBLE
        write_release_json(Pose.from_array(a), tmp_path / f"{name}.json")
        arrays.append(a)
    (tmp_path / "c.json").write_text('{"not": "a pose"}')
    got = B.keypoint_folder_poses(tmp_path)
    assert got.shape == (2, 17, 3)
    np.testing.assert_allclose(got[:, :, :2], np.stack(arrays[::-1])[:, :, :2], atol=1e-3)  # sorted by name
    assert B.keypoint_folder_poses(tmp_path / "empty").shape == (0, 17, 3)
