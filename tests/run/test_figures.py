"""The notebooks' figure helpers (kpnb.run.figures) on tiny inputs: what each draws where, and the files."""
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from kpnb.data import filtering
from kpnb.poses.pose import VISIBLE, Pose
from kpnb.run import figures

matplotlib.use("Agg")


def images(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 255, (n, size, size, 3), dtype=np.uint8)


def pose_arrays(n, seed=0):
    p = np.zeros((n, 17, 3), np.float32)
    p[..., :2] = np.random.default_rng(seed).uniform(0.2, 0.8, (n, 17, 2))
    p[..., 2] = VISIBLE
    return p


def titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_labelled_rows_name_each_row_on_its_first_image(tmp_path):
    fig = figures.labelled_rows([("a", list(images(3))), ("b", list(images(3, seed=1)))], path=tmp_path / "r.png",
                                suptitle="top")
    assert titles(fig) == ["a", "", "", "b", "", ""] and fig._suptitle.get_text() == "top"
    assert (tmp_path / "r.png").stat().st_size > 0


def test_samples_by_pose_put_each_pose_before_its_samples():
    p = [Pose.from_array(a) for a in pose_arrays(2)]
    ims = images(6)
    tiles = figures.samples_by_pose(p, ims, 3, px=16)
    assert len(tiles) == 8 and tiles[0].shape == (16, 16, 3) and tiles[4].shape == (16, 16, 3)
    np.testing.assert_array_equal(tiles[5], ims[3])
    np.testing.assert_array_equal(tiles[1], ims[0])


def test_removed_and_kept_draw_each_stage_and_the_kept_images(tmp_path):
    class Cands:
        images, poses = images(6), pose_arrays(6)
        labels = [{"label": f"l{i}"} for i in range(6)]

    def result(name, removed):
        keep = np.array([i not in removed for i in range(6)])
        return filtering.StageResult(name, keep, ["" if k else f"{name}: why {i}" for i, k in enumerate(keep)])

    paths = []
    figures.removed_and_kept(Cands, [result("tags", {1}), result("pose", {1, 2})], np.random.default_rng(0),
                             lambda name: paths.append(name) or tmp_path / f"{name}.png", n=20)
    assert paths == ["removed_tags", "removed_pose", "kept"]
    assert all((tmp_path / f"{name}.png").stat().st_size > 0 for name in paths)


def test_conditioning_inputs_guidance_sweep_code_grids_and_loss_levels(tmp_path):
    fig = figures.conditioning_inputs(images(2), pose_arrays(2), np.arange(34).reshape(2, 17), np.ones((2, 4, 4)),
                                      path=tmp_path / "c.png")
    assert titles(fig)[2:4] == ["grid context (17 values)"] * 2 and titles(fig)[4] == "skeleton maps 4x4"
    fig = figures.guidance_sweep({0.0: {"pck@0.1": 0.1, "fid": 5.0}, 2.0: {"pck@0.1": 0.3, "fid": 7.0}}, 0.5,
                                 [0, 600], 8, path=tmp_path / "g.png")
    pck_ax, fid_ax = fig.axes
    np.testing.assert_array_equal(pck_ax.lines[0].get_ydata(), [0.1, 0.3])
    np.testing.assert_array_equal(fid_ax.lines[0].get_ydata(), [5.0, 7.0])
    assert pck_ax.get_xlabel() == "guidance scale (at 0 <= t < 600)" and fid_ax.get_ylabel().startswith("FID (8")
    codes = np.arange(8).reshape(2, 2, 2)
    fig = figures.code_grids(images(2), pose_arrays(2), np.arange(34).reshape(2, 17), codes, images(2, 16),
                             path=tmp_path / "t.png")
    assert titles(fig)[:2] == ["pose tokens [0, 1, 2]...", "pose tokens [17, 18, 19]..."]
    assert [t.get_text() for t in fig.axes[2].texts] == ["0", "1", "2", "3"]  # small grids are numbered
    fig = figures.loss_with_levels([{"step": 1, "loss": 3.0}, {"step": 2, "lr": 0.1}, {"step": 3, "loss": 2.0}],
                                   {"held-out": 2.5, "code entropy": 4.0}, path=tmp_path / "l.png", ylabel="nats")
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [1, 3])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train", "held-out 2.500", "code entropy 4.000"]
    assert all(Path(tmp_path / f"{n}.png").stat().st_size > 0 for n in "cgtl")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
