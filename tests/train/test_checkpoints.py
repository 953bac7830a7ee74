"""Checkpoint files: the tensor file's size and sha256 in the JSON, a damaged checkpoint named and passed over
when one is chosen, a clear error when every one is damaged, and checkpoints older than the record still load."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from kpnb.core.settings import preset_config
from kpnb.models.vq import VQModel, vq_config_for
from kpnb.train import checkpoints, vq


def _net(seed: int, width: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, 1))


def _build(cfg) -> nn.Module:
    return _net(1234, cfg["width"])  # other weights than any saved: a load must overwrite them all


def _save(folder: Path, step: int, model: nn.Module) -> Path:
    return checkpoints.save_checkpoint(folder, step, {"model": model}, config={"net": {"width": 5}})


def _same(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # a byte of the last tensor: the file still parses, at the same size
    path.write_bytes(bytes(data))


def test_the_json_records_the_tensor_files_size_and_sha256(tmp_path):
    js = _save(tmp_path, 3, _net(0))
    st = js.with_suffix(".safetensors")
    assert json.loads(js.read_text())["tensors"] == {
        "file": st.name, "bytes": st.stat().st_size, "sha256": hashlib.sha256(st.read_bytes()).hexdigest()}


def test_a_changed_byte_is_caught_when_loading_and_load_trained_falls_back(tmp_path, capsys):
    first, second = _net(0), _net(1)
    _save(tmp_path, 1, first)
    newest = _save(tmp_path, 2, second).with_suffix(".safetensors")
    _flip_last_byte(newest)
    # choosing by size alone (cheap) cannot see it; loading checks the hash
    assert checkpoints.latest_checkpoint(tmp_path).name == "ckpt-0000002.json"
    capsys.readouterr()
    model = checkpoints.load_trained(tmp_path, "net", _build)
    out = capsys.readouterr().out
    assert _same(model, first) and f"damaged checkpoint {newest}" in out and "sha256" in out
    assert checkpoints.latest_checkpoint(tmp_path, verify=True).name == "ckpt-0000001.json"
    loaded = _net(7)
    assert checkpoints.load_checkpoint(tmp_path, {"model": loaded})["step"] == 1 and _same(loaded, first)
    with pytest.raises(checkpoints.CheckpointError, match="sha256"):  # a file named outright is not swapped
        checkpoints.load_checkpoint(newest.with_suffix(".json"), {"model": loaded})


def test_every_checkpoint_damaged_is_an_error_naming_each(tmp_path):
    _save(tmp_path, 1, _net(0))
    _save(tmp_path, 2, _net(1))
    (tmp_path / "ckpt-0000001.safetensors").unlink()
    newest = tmp_path / "ckpt-0000002.safetensors"
    newest.write_bytes(newest.read_bytes()[:50])
    for choose in (checkpoints.latest_checkpoint, checkpoints.read_checkpoint,
                   lambda d: checkpoints.load_trained(d, "net", _build)):
        with pytest.raises(checkpoints.CheckpointError, match="every checkpoint is damaged") as err:
            choose(tmp_path)
        msg = str(err.value)
        assert f"{newest} (50 bytes where" in msg
        assert f"{tmp_path / 'ckpt-0000001.safetensors'} (the tensor file is missing" in msg


def test_a_checkpoint_written_before_the_record_still_loads(tmp_path):
    model = _net(0)
    js = _save(tmp_path, 4, model)
    info = json.loads(js.read_text())
    del info["tensors"]
    js.write_text(json.dumps(info))
    assert checkpoints.latest_checkpoint(tmp_path, verify=True) == js
    assert _same(checkpoints.load_trained(tmp_path, "net", _build), model)


def test_the_notebooks_loaders_fall_back_too(tmp_path, capsys):
    # vq.load_vq, as `kpnb sample` and the notebooks call it (through load_trained)
    cfg = vq_config_for("f8", preset_config("smoke")["vq"])
    models = []
    for step in (1, 2):
        torch.manual_seed(step)
        models.append(VQModel(cfg))
        checkpoints.save_checkpoint(tmp_path, step, {"model": models[-1]}, config={"model": cfg.to_dict()})
    newest = tmp_path / "ckpt-0000002.safetensors"
    _flip_last_byte(newest)
    loaded = vq.load_vq(tmp_path)
    assert _same(loaded, models[0]) and f"damaged checkpoint {newest}" in capsys.readouterr().out
