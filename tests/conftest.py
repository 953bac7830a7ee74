"""Fixtures shared by several test modules."""
from __future__ import annotations

import pytest

from kpnb.core import runtime, settings
from kpnb.data import subset
from kpnb.run import folder, stages
from kpnb.synth import renders


@pytest.fixture(autouse=True)
def restore_runtime():
    """``kpnb train`` and ``NotebookRun`` set the process's runtime (its keep_checkpoints among the rest): each
    test starts from the runtime the one before it started from."""
    before = runtime.current()
    yield
    runtime.use(before)


@pytest.fixture(scope="session")
def tiny_ldm_run(tmp_path_factory):
    """A smoke run folder with a trained f4 autoencoder and a (6-step) skeleton diffusion model. Shared: a
    test that changes it works on a copy."""
    root = tmp_path_factory.mktemp("run") / "run"
    folder.run_dir(root, "smoke")
    images, poses = renders.render_truth(32, seed=5, image_size=32, render_size=64)
    subset.save_subset(root, "train", ids=[f"r{i}" for i in range(32)], images=images, poses=poses,
                     captions=[""] * 32, attrs=[{}] * 32)
    cfg = settings.run_config(root)
    stages.train_vq(root, cfg, "f4", progress=False)
    stages.train_ldm(root, cfg, "f4", "skeleton", progress=False)
    return root
