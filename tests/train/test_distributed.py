"""kpnb train under torchrun (gloo, 2 CPU processes) against one process; kill and resume; N -> M ranks."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kpnb import cli
from kpnb.core import files, settings
from kpnb.data import subset
from kpnb.run import folder, stages
from kpnb.synth import renders
from kpnb.train import checkpoints
from kpnb.train import loop as training

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")

MODE = "tokens+skeleton"  # both conditioning paths: the cross-attention context and the concatenated maps
LDM = ["-p", "diffusion.ckpt_every=10", "-p", "diffusion.warmup=0"]


@pytest.fixture(scope="module")
def run_template(tmp_path_factory) -> Path:
    """A smoke run folder with a training subset (exact renders) and a trained f4 autoencoder."""
    root = tmp_path_factory.mktemp("run") / "run"
    folder.run_dir(root, "smoke")
    for split, n, seed in (("train", 48, 5), ("val", 16, 6)):
        images, poses = renders.render_truth(n, seed=seed, image_size=32, render_size=64)
        subset.save_subset(root, split, ids=[f"{split}{i}" for i in range(n)], images=images, poses=poses,
                         captions=[""] * n, attrs=[{}] * n)
    for spec in ("f4", "f8"):
        stages.train_vq(root, settings.run_config(root), spec, progress=False)
    return root


def _copy(template: Path, dst: Path) -> Path:
    shutil.copytree(template, dst)
    return dst


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _train(root: Path, steps: int, nproc: int, *extra: str, wait: bool = True):
    args = ["train", "ldm", "--run-dir", str(root), "--mode", MODE, "--no-progress", *LDM,
            "-p", f"diffusion.steps={steps}", *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "kpnb", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), "-m", "kpnb", *args]
    if not wait:
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def _ckpt(root: Path) -> Path:
    return root / "checkpoints" / f"ldm-f4-{MODE}"


def _params(root: Path) -> dict[str, torch.Tensor]:
    tensors, _ = files.load_tensors(checkpoints.latest_checkpoint(_ckpt(root)).with_suffix(".safetensors"))
    return {k: v for k, v in tensors.items() if k.startswith("module/")}


def _losses(root: Path) -> dict[int, float]:
    rows = training._read_csv(_ckpt(root) / "metrics.csv")
    return {int(r["step"]): r["loss"] for r in rows}


def _adam_bound(steps: int, cfg: dict) -> float:
    """The most AdamW can move one coordinate in ``steps`` steps (|update| <= lr per step, about): two runs
    whose gradient differs only by float rounding can differ by at most twice this where the true gradient is
    zero - the coordinates just behind the UNet's zero-initialised output layer in the first steps."""
    return 2 * sum(training.warmup_cosine(s, steps, cfg["lr"], 0, final_frac=1.0) for s in range(steps)) * 1.01


def test_two_ranks_train_what_one_process_trains(run_template, tmp_path):
    one, two = _copy(run_template, tmp_path / "one"), _copy(run_template, tmp_path / "two")
    _train(one, 20, 1)
    r = _train(two, 20, 2)
    assert "2 ranks" in r.stdout
    la, lb = _losses(one), _losses(two)
    assert sorted(la) == [10, 20] and sorted(lb) == [10, 20]  # rank 0 alone wrote the CSV, one row per log
    for s in la:  # the logged loss is the mean over the ranks: the global batch's loss
        assert abs(la[s] - lb[s]) <= 1e-5 * abs(la[s]), (s, la[s], lb[s])
    pa, pb = _params(one), _params(two)
    assert set(pa) == set(pb)
    diff = {k: float((pa[k] - pb[k]).abs().max()) for k in pa}
    close = [k for k, d in diff.items() if d <= 1e-5]
    # every tensor within 1e-5, except where Adam normalises a gradient that is zero up to float rounding
    assert len(close) >= 0.9 * len(diff), sorted(diff.items(), key=lambda kv: -kv[1])[:10]
    bound = _adam_bound(20, settings.run_config(one)["diffusion"])
    assert max(diff.values()) <= bound, (max(diff.values()), bound)


def test_checkpoint_of_two_ranks_resumes_on_one(run_template, tmp_path):
    """N -> M: 10 steps on 2 ranks, then 10 more in one process, equals 20 steps in one process."""
    split, whole = _copy(run_template, tmp_path / "split"), _copy(run_template, tmp_path / "whole")
    _train(split, 10, 2)
    assert json.loads(checkpoints.latest_checkpoint(_ckpt(split)).read_text())["world_size"] == 2
    _train(split, 20, 1)
    _train(whole, 20, 1)
    la, lb = _losses(split), _losses(whole)
    assert abs(la[20] - lb[20]) <= 1e-5 * abs(lb[20]), (la, lb)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_killed_rank_resumes_from_last_checkpoint(run_template, tmp_path):
    """SIGKILL one of two ranks after a checkpoint: torchrun stops the run; starting it again resumes from
    the last checkpoint and logs the losses an uninterrupted run logs."""
    killed, whole = _copy(run_template, tmp_path / "killed"), _copy(run_template, tmp_path / "whole")
    proc = _train(killed, 100000, 2, wait=False)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            last = checkpoints.latest_checkpoint(_ckpt(killed))
            if last is not None and json.loads(last.read_text())["step"] >= 20:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint at step 20 within 4 minutes")
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    resumed_at = json.loads(checkpoints.latest_checkpoint(_ckpt(killed)).read_text())["step"]
    assert resumed_at >= 20 and resumed_at % 10 == 0
    end = resumed_at + 20
    # the config differs only in "steps", which a resume may change
    _train(killed, end, 2)
    _train(whole, end, 2)
    la, lb = _losses(killed), _losses(whole)
    for s in range(resumed_at + 10, end + 1, 10):
        assert abs(la[s] - lb[s]) <= 1e-5 * abs(lb[s]), (s, la.get(s), lb.get(s))
    assert np.isfinite(list(la.values())).all()


def test_notebook_04_goes_on_from_what_torchrun_trained(run_template, tmp_path):
    """A mode trained by `kpnb train` under torchrun is found by notebook 04, which trains only the others."""
    root = _copy(run_template, tmp_path / "run")
    steps = settings.run_config(root)["diffusion"]["steps"]
    _train(root, steps, 2)
    last = checkpoints.latest_checkpoint(_ckpt(root))
    before = last.read_bytes()
    assert cli.main(["run", "--resume", str(root), "--only", "04", "--no-progress"]) == 0
    assert checkpoints.latest_checkpoint(_ckpt(root)) == last and last.read_bytes() == before  # not retrained
    assert json.loads(last.read_text())["world_size"] == 2
    m = files.read_metrics(root, "04_ldm_training")
    assert m[f"{MODE}.train_steps"] == steps and "grid.train_steps" in m
