"""The shared training loop: resume after SIGKILL, exact resumption, NaN guard, no unpickling, the newest
checkpoints kept and a damaged one passed over."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from kpnb.core import files
from kpnb.train import checkpoints
from kpnb.train import loop as training

# A tiny regression run; the global torch RNG is used inside the step (noise on the targets) so that exact
# resumption needs the RNG state restored, not just the weights and the data order.
SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from torch import nn
    from kpnb.train import loop as training
    torch.set_num_threads(1)
    ckpt, log, steps, sleep = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    g = torch.Generator().manual_seed(123)
    X = torch.randn(64, 4, generator=g); Y = X @ torch.randn(4, 1, generator=g)
    torch.manual_seed(999)  # weights differ from the resumed ones until the checkpoint is loaded
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    def batch_fn(step):
        i = training.batch_indices(len(X), 8, step, seed=5)
        return X[i], Y[i]
    def step_fn(step, batch):
        x, y = batch
        loss = (model(x) - y - 0.1 * torch.randn_like(y)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        with open(log, "a") as f:
            f.write(f"{step} {loss.item()!r}\\n")
        time.sleep(sleep)
        return {"loss": loss}
    training.train({"model": model}, {"opt": opt}, step_fn, batch_fn,
                   training.LoopSettings(steps=steps, ckpt_dir=ckpt, config={"width": 8, "steps": steps},
                                         batch_size=8, ckpt_every=10, log_every=5, seed=7, progress=False))
""")


def _run(tmp: Path, ckpt: Path, log: Path, steps: int, sleep: float = 0.0, wait: bool = True):
    script = tmp / "run_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(script), str(ckpt), str(log), str(steps), str(sleep)]
    if wait:
        subprocess.run(args, check=True, env=env, timeout=120)
        return None
    return subprocess.Popen(args, env=env)


def _run_here(tmp: Path, ckpt: Path, log: Path, steps: int) -> None:
    """The same script in this process (saves a torch start-up); global state is put back afterwards."""
    import runpy

    script = tmp / "run_train_here.py"
    script.write_text(SCRIPT)
    import random

    import numpy as np

    argv, threads, rng = sys.argv, torch.get_num_threads(), torch.get_rng_state()
    np_rng, py_rng = np.random.get_state(), random.getstate()
    sys.argv = [str(script), str(ckpt), str(log), str(steps), "0"]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
        np.random.set_state(np_rng)
        random.setstate(py_rng)


def _losses(log: Path) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for line in log.read_text().split("\n"):
        if line:
            step, value = line.split()
            out.setdefault(int(step), []).append(value)
    return out


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    steps = 80
    ref_ckpt, ref_log = tmp_path / "ref", tmp_path / "ref.log"
    _run_here(tmp_path, ref_ckpt, ref_log, steps)  # the uninterrupted reference, in this process
    ref = _losses(ref_log)
    assert sorted(ref) == list(range(steps))

    ckpt, log = tmp_path / "ck", tmp_path / "ck.log"
    proc = _run(tmp_path, ckpt, log, steps, sleep=0.05, wait=False)
    deadline = time.time() + 60
    while time.time() < deadline:  # kill once at least two checkpoints were written
        last = checkpoints.latest_checkpoint(ckpt)
        if last is not None and json.loads(last.read_text())["step"] >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(log))
    assert killed_at < steps - 1, "the run finished before it was killed; the test proves nothing"
    saved = checkpoints.read_checkpoint_info(ckpt)["step"]
    assert 20 <= saved <= killed_at + 1

    _run(tmp_path, ckpt, log, steps)  # resume
    seen = _losses(log)
    # every step, before the kill and after the resume, computed exactly the uninterrupted run's loss
    assert sorted(seen) == list(range(steps))
    for step, values in seen.items():
        assert set(values) == {ref[step][0]}, f"step {step}: {values} != {ref[step]}"
    # steps from the checkpoint up to the kill were computed twice (before the kill and after the resume)
    assert [len(seen[s]) for s in range(steps)] == [2 if saved <= s <= killed_at else 1 for s in range(steps)]

    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["ckpt-0000070.json", "ckpt-0000070.safetensors", "ckpt-0000080.json", "ckpt-0000080.safetensors",
                     "metrics.csv"], names  # the newest two (runtime.keep_checkpoints' default)
    rows = (ckpt / "metrics.csv").read_text().splitlines()
    logged_steps = [int(r.split(",")[0]) for r in rows[1:]]
    assert logged_steps == list(range(5, steps + 1, 5))  # no duplicated rows from the killed part


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def _fit(ckpt: Path, steps: int, losses: list[float], nan_at: int | None = None, model_seed: int = 0, **loop_kw):
    model, opt = _tiny(model_seed)
    X = torch.linspace(-1, 1, 30)[:, None].repeat(1, 3)

    def step_fn(step, x):
        loss = (model(x) - x.sum(1, keepdim=True) * torch.rand(1)).pow(2).mean()
        if step == nan_at:
            loss = loss * float("nan")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        return {"loss": loss, "mse": loss.detach()}

    loop = training.LoopSettings(steps=steps, ckpt_dir=ckpt, config={"kind": "tiny"}, batch_size=4, ckpt_every=5,
                                 log_every=2, seed=3, progress=False, **loop_kw)
    res = training.train({"model": model}, {"opt": opt}, step_fn,
                         lambda s: X[training.batch_indices(30, 4, s, seed=1)], loop)
    return model, res


def test_in_process_resume_is_exact(tmp_path):
    ref: list[float] = []
    ref_model, _ = _fit(tmp_path / "a", 20, ref)
    first: list[float] = []
    _fit(tmp_path / "b", 10, first)
    torch.manual_seed(12345)  # scramble the global RNG: resuming must restore it
    second: list[float] = []
    model, res = _fit(tmp_path / "b", 20, second, model_seed=99)
    assert res.start_step == 10 and res.step == 20
    assert first + second == ref
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(a, b)
    # the metrics CSV has one row per log step, losses and throughput in it
    header, *rows = (tmp_path / "b" / "metrics.csv").read_text().splitlines()
    assert header.split(",") == ["step", "loss", "mse", "seconds", "images_per_s"]
    assert [int(r.split(",")[0]) for r in rows] == list(range(2, 21, 2))


def test_resume_with_another_config_is_refused(tmp_path):
    _fit(tmp_path, 5, [])
    model, opt = _tiny()
    with pytest.raises(checkpoints.CheckpointError, match="different config"):
        training.train({"model": model}, {"opt": opt}, lambda s, b: {"loss": 0.0}, lambda s: None,
                       training.LoopSettings(steps=10, ckpt_dir=tmp_path, config={"kind": "other"}, progress=False))


def test_resume_past_the_asked_steps_is_refused(tmp_path):
    # a folder trained 10 steps asked for 5: a clear error, not a silent 10-step model called a 5-step one
    _fit(tmp_path, 10, [])
    with pytest.raises(checkpoints.CheckpointError, match="already trained 10 steps, past the 5"):
        _fit(tmp_path, 5, [])


def test_nan_loss_stops_cleanly_and_keeps_last_checkpoint(tmp_path):
    _fit(tmp_path, 10, [])  # a good checkpoint at step 10
    good_tensors, _ = files.load_tensors(tmp_path / "ckpt-0000010.safetensors")
    with pytest.raises(checkpoints.NonFiniteLossError) as err:
        _fit(tmp_path, 30, [], nan_at=17)  # resumes at 10, checkpoint at 15, NaN at 17
    msg = str(err.value)
    assert "'loss'" in msg and "step 17" in msg and "ckpt-0000015" in msg
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ckpt")) == [
        "ckpt-0000010.json", "ckpt-0000010.safetensors", "ckpt-0000015.json", "ckpt-0000015.safetensors"]
    info = checkpoints.read_checkpoint_info(tmp_path)
    assert info["step"] == 15
    model, _ = _tiny()
    checkpoints.load_checkpoint(tmp_path, {"model": model})
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert set(good_tensors) == set(files.load_tensors(tmp_path / "ckpt-0000015.safetensors")[0])


def test_non_finite_weights_are_never_saved(tmp_path):
    model, opt = _tiny()

    def step_fn(step, _):
        if step == 3:
            with torch.no_grad():
                model[0].weight[0, 0] = float("inf")  # the loss of this step was still finite
        return {"loss": 1.0}

    with pytest.raises(checkpoints.NonFiniteLossError, match=r"0\.weight"):
        training.train({"model": model}, {"opt": opt}, step_fn, lambda s: None,
                       training.LoopSettings(steps=8, ckpt_dir=tmp_path, ckpt_every=4, progress=False))
    assert checkpoints.latest_checkpoint(tmp_path) is None


class _Payload:
    """Unpickling this would run a shell command that creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_running_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "weights.pt"
    torch.save({"weight": _Payload(marker)}, evil)
    model, _ = _tiny()
    with pytest.raises(files.UnsafeFileError):
        files.load_tensors(evil)
    with pytest.raises(files.UnsafeFileError):
        checkpoints.load_checkpoint(evil, {"model": model})
    # the same pickle disguised as the latest checkpoint of a folder
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "ckpt-0000010.safetensors").write_bytes(evil.read_bytes())
    files.write_json(folder / "ckpt-0000010.json", {"step": 10, "config": {}})
    with pytest.raises(ValueError):
        checkpoints.load_checkpoint(folder, {"model": model})
    assert not marker.exists()


def test_batch_indices_cover_each_epoch_once():
    n, bs = 10, 4
    seq = torch.cat([training.batch_indices(n, bs, s, seed=2) for s in range(5)])  # 20 = two epochs
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:].tolist()) == list(range(10))
    assert not torch.equal(seq[:10], seq[10:])
    assert torch.equal(training.batch_indices(n, bs, 3, seed=2), training.batch_indices(n, bs, 3, seed=2))
    assert not torch.equal(training.batch_indices(n, bs, 0, seed=2), training.batch_indices(n, bs, 0, seed=3))


def test_fork_checkpoint_trains_further_elsewhere(tmp_path):
    ref: list[float] = []
    _fit(tmp_path / "ref", 20, ref)
    _fit(tmp_path / "base", 10, [])
    before = sorted(p.name for p in (tmp_path / "base").iterdir())
    used = checkpoints.fork_checkpoint(tmp_path / "base", tmp_path / "long")
    assert used.name == "ckpt-0000010.json"
    more: list[float] = []
    _, res = _fit(tmp_path / "long", 20, more)
    assert res.start_step == 10 and more == ref[10:]  # goes on exactly as an uninterrupted run
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == before  # the source is untouched
    assert checkpoints.fork_checkpoint(tmp_path / "base", tmp_path / "long").name == "ckpt-0000020.json"
    with pytest.raises(checkpoints.CheckpointError, match="no checkpoint"):
        checkpoints.fork_checkpoint(tmp_path / "empty", tmp_path / "x")


# ---- the newest checkpoints kept, a damaged one passed over ------------------------------------------------
def _steps(folder: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in folder.glob("ckpt-*.json"))


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_a_truncated_newest_checkpoint_is_named_and_training_goes_on_from_the_one_before(tmp_path, capsys):
    ref10, _ = _fit(tmp_path / "ref10", 10, [])
    ref20, _ = _fit(tmp_path / "ref20", 20, [])
    ck = tmp_path / "ck"
    _fit(ck, 10, [])
    assert _steps(ck) == [5, 10]
    newest = ck / "ckpt-0000010.safetensors"
    with open(newest, "r+b") as f:
        f.truncate(newest.stat().st_size - 100)
    capsys.readouterr()
    model, res = _fit(ck, 10, [], model_seed=99)  # back to step 10: the damaged checkpoint is written again
    out = capsys.readouterr().out
    assert res.start_step == 5 and f"damaged checkpoint {newest}" in out and "bytes where" in out
    assert "ckpt-0000005.json" in out  # says which one it goes on from
    assert _same_weights(model, ref10) and _steps(ck) == [5, 10]
    redone, _ = files.load_tensors(newest)
    want, _ = files.load_tensors(tmp_path / "ref10" / "ckpt-0000010.safetensors")
    assert redone.keys() == want.keys() and all(torch.equal(redone[k], want[k]) for k in want)
    assert checkpoints.latest_checkpoint(ck, verify=True).name == "ckpt-0000010.json"
    # the same damage, then straight on to the end: the weights of an undamaged, uninterrupted run
    with open(newest, "r+b") as f:
        f.truncate(1000)
    model, res = _fit(ck, 20, [], model_seed=99)
    assert res.start_step == 5 and _same_weights(model, ref20) and _steps(ck) == [15, 20]
    rows = (ck / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(2, 21, 2))  # the redone steps logged once


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_the_newest_keep_checkpoints_are_kept(tmp_path, keep):
    _fit(tmp_path, 20, [], keep_checkpoints=keep)
    assert _steps(tmp_path) == [20, 15, 10][:keep][::-1]
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.safetensors")) == [
        f"ckpt-{s:07d}.safetensors" for s in _steps(tmp_path)]
    with pytest.raises(ValueError, match="keep_checkpoints"):
        training.LoopSettings(steps=1, ckpt_dir=tmp_path, keep_checkpoints=0)


def test_cleaning_removes_a_damaged_older_checkpoint_and_a_fresh_start_replaces_the_old_run(tmp_path, capsys):
    _fit(tmp_path, 10, [])
    older = tmp_path / "ckpt-0000005.safetensors"
    data = bytearray(older.read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash tells
    older.write_bytes(bytes(data))
    _fit(tmp_path, 15, [], keep_checkpoints=3)  # keeps 10 and 15; the damaged 5 is not a checkpoint to keep
    assert _steps(tmp_path) == [10, 15] and f"damaged checkpoint {older}" in capsys.readouterr().out
    _fit(tmp_path, 5, [], resume=False)  # a fresh start: its first checkpoint replaces the old run's
    assert _steps(tmp_path) == [5]
