"""A full disk names itself: the file, the bytes it needed and the space left. Nothing already complete is
touched, and the same call goes on once space is freed. On a small tmpfs where the tests may mount one (root),
else the tmpfs tests are skipped and the patched-write test still checks the error."""
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from kpnb.core import files
from kpnb.core.settings import preset_config
from kpnb.data import shards
from kpnb.diffusion import ldm
from kpnb.models.vq import VQModel, vq_config_for
from kpnb.synth.dataset import write_dataset
from kpnb.train import checkpoints, loop


class Disk:
    """A mounted tmpfs that a test can fill up and free again."""

    def __init__(self, root: Path):
        self.root, self.filler = root, root / "filler"

    def fill(self) -> None:
        with open(self.filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, shutil.disk_usage(self.root).free)
        assert shutil.disk_usage(self.root).free < 4096

    def free(self) -> None:
        self.filler.unlink()


@pytest.fixture
def disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode})")
    yield Disk(mnt)
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_a_failed_write_names_the_file_and_the_bytes_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.json"
    files.write_json(path, {"a": 1})

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "_write_all", full)
    data = b"x" * 1234
    with pytest.raises(files.DiskFullError) as err:
        files.atomic_write_bytes(path, data)
    msg = str(err.value)
    assert str(path) in msg and "1,234 bytes" in msg and "free in" in msg and err.value.errno == errno.ENOSPC
    assert json.loads(path.read_text()) == {"a": 1} and _no_temp_files(tmp_path)


def test_metrics_on_a_full_disk(disk):
    run = disk.root / "run"
    files.write_metrics(run, "01_x", {"a": 1}, preset="smoke", seconds=1.0)
    disk.fill()
    with pytest.raises(files.DiskFullError, match=r"01_x\.json needs [\d,]+ bytes, [\d,]+ bytes are free"):
        files.write_metrics(run, "01_x", {"a": 2, "note": "x" * 8000}, preset="smoke", seconds=1.0)
    assert files.read_metrics(run, "01_x")["a"] == 1 and _no_temp_files(run)
    disk.free()
    files.write_metrics(run, "01_x", {"a": 2}, preset="smoke", seconds=1.0)
    assert files.read_metrics(run, "01_x")["a"] == 2


def _fit(ckpt: Path, steps: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    X = torch.linspace(-1, 1, 30)[:, None].repeat(1, 3)

    def step_fn(step, x):
        loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"loss": loss}

    settings = loop.LoopSettings(steps=steps, ckpt_dir=ckpt, config={"kind": "tiny"}, batch_size=4, ckpt_every=5,
                                 log_every=5, seed=3, progress=False)
    loop.train({"model": model}, {"opt": opt}, step_fn, lambda s: X[loop.batch_indices(30, 4, s, seed=1)], settings)
    return model


def test_a_checkpoint_on_a_full_disk_leaves_the_last_one_and_resume_finishes(disk, tmp_path):
    ref = _fit(tmp_path / "ref", 10)
    ckpt = disk.root / "ckpt"
    _fit(ckpt, 5)
    disk.fill()
    with pytest.raises(files.DiskFullError) as err:
        _fit(ckpt, 10)
    assert str(ckpt) in str(err.value) and "bytes are free" in str(err.value)
    last = checkpoints.latest_checkpoint(ckpt)
    assert checkpoints.read_checkpoint_info(last)["step"] == 5 and _no_temp_files(ckpt)
    disk.free()
    model = _fit(ckpt, 10)
    assert checkpoints.read_checkpoint_info(checkpoints.latest_checkpoint(ckpt))["step"] == 10
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_the_latents_cache_on_a_full_disk(disk):
    torch.manual_seed(0)
    vq = VQModel(vq_config_for("f8", preset_config("smoke")["vq"])).eval()
    images = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    path = disk.root / "latents" / "f8-train.npy"
    disk.fill()
    with pytest.raises(files.DiskFullError, match=r"f8-train\.npy needs [\d,]+ bytes"):
        ldm.latent_cache(vq, images, path, identity={"vq": "x"}, progress=False)
    assert not path.exists() and _no_temp_files(disk.root / "latents")
    disk.free()
    lat = ldm.latent_cache(vq, images, path, identity={"vq": "x"}, progress=False)
    assert lat.shape[:2] == (6, 2) and path.with_suffix(".json").exists()


def test_a_shard_on_a_full_disk_and_the_pack_goes_on(disk, tmp_path):
    src = tmp_path / "ds"
    write_dataset(src, 12, image_size=32, render_size=64, seed=3, workers=1, progress=False)
    out = disk.root / "shards"
    disk.fill()
    with pytest.raises(OSError, match=r"writing \S+ needs .* bytes are free in") as err:
        shards.pack(src, out, size=32, shard_size=4, workers=1, progress=False)
    assert err.value.errno == errno.ENOSPC and str(out) in str(err.value)
    assert _no_temp_files(out)
    disk.free()
    manifest = shards.pack(src, out, size=32, shard_size=4, workers=1, progress=False)
    assert manifest["n_shards"] == 3 and len(list(out.glob("shard-*.tar"))) == 3
