import json
import subprocess
import sys

import pytest

from kpnb import cli, runs


def test_preset_config_overrides_and_refusals():
    cfg = runs.preset_config("smoke", {"data.n_candidates": 10})
    assert cfg["data"]["n_candidates"] == 10
    assert runs.PRESETS["smoke"]["data"]["n_candidates"] != 10  # presets are not mutated
    with pytest.raises(runs.ConfigError, match="valid presets: smoke, cpu, gpu"):
        runs.preset_config("fast")
    with pytest.raises(runs.ConfigError, match="data.image_size"):
        runs.preset_config("smoke", {"data.nope": 1})
    with pytest.raises(runs.ConfigError, match="valid sections"):
        runs.preset_config("smoke", {"nosection.x": 1})
    with pytest.raises(runs.ConfigError, match="expects int"):
        runs.preset_config("smoke", {"data.n_candidates": "many"})


def _leaves(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


@pytest.mark.parametrize("preset", list(runs.PRESETS))
def test_every_preset_has_every_base_key(preset):
    # presets are BASE plus a delta: a key the code reads under one preset exists under all of them
    assert set(_leaves(runs.PRESETS[preset])) == set(_leaves(runs.BASE))
    assert runs.preset_config(preset) == runs.PRESETS[preset]


def test_preset_delta_with_unknown_key_is_refused():
    with pytest.raises(KeyError, match="smoke: diffusion.stepz"):
        runs._merged(runs.BASE, {"diffusion": {"stepz": 1}}, "smoke: ")
    merged = runs._merged(runs.BASE, {"vq": {"models": {"f8": {"n_codes": 7}}}}, "x: ")
    assert merged["vq"]["models"]["f8"]["n_codes"] == 7
    assert merged["vq"]["models"]["f8"]["base_width"] == runs.BASE["vq"]["models"]["f8"]["base_width"]
    assert runs.BASE["vq"]["models"]["f8"]["n_codes"] != 7  # BASE is not mutated


def test_settings_read_log(tmp_path, monkeypatch):
    log = tmp_path / "read.jsonl"
    monkeypatch.setenv(runs.SETTINGS_LOG_ENV, str(log))
    nb = runs.NotebookRun("01_x", "smoke", str(tmp_path / "run"))
    assert nb.cfg["data"]["seed"] == 0 and nb.cfg["vq"].get("steps") == 6
    nb.finish({})
    assert json.loads(log.read_text()) == {"notebook": "01_x", "read": ["data.seed", "vq.steps"]}


def test_run_dir_refuses_mixed_presets(tmp_path):
    runs.run_dir(tmp_path / "r", "smoke")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["preset"] == "smoke"
    with pytest.raises(runs.ConfigError, match="smoke"):
        runs.run_dir(tmp_path / "r", "cpu")


def test_metrics_file(tmp_path):
    runs.run_dir(tmp_path, "smoke")
    p = runs.write_metrics(tmp_path, "01_x", {"a": 1.5, "b": None, "notes": "why"}, preset="smoke", seconds=3.21)
    m = json.loads(p.read_text())
    assert m["a"] == 1.5 and m["b"] is None and m["preset"] == "smoke" and m["torch_threads"] >= 1
    with pytest.raises(TypeError, match="nested"):
        runs.write_metrics(tmp_path, "01_x", {"a": {"b": 1}}, preset="smoke", seconds=0)


def test_atomic_write_leaves_no_temp_on_error(tmp_path):
    runs.atomic_write_bytes(tmp_path / "f.bin", b"ok")
    with pytest.raises(TypeError):
        runs.atomic_write_bytes(tmp_path / "f.bin", 12345)  # not bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    assert (tmp_path / "f.bin").read_bytes() == b"ok"


def test_every_notebook_has_parameters_and_no_outputs():
    nbs = cli.list_notebooks()
    assert len(nbs) >= 2
    for nb in nbs:
        params = cli.notebook_parameters(nb)
        for name in cli.COMMON_PARAMETERS:
            assert name in params, f"{nb.name} lacks parameter {name}"
        data = json.loads(nb.read_text())
        assert not any(c.get("outputs") for c in data["cells"] if c["cell_type"] == "code"), nb.name


def _kpnb(*args):
    return subprocess.run([sys.executable, "-m", "kpnb.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_refuses_unknown_preset_and_parameter(tmp_path):
    r = _kpnb("run", "--preset", "turbo", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "valid presets: smoke, cpu, gpu" in r.stderr
    assert not (tmp_path / "a").exists()  # refused before any work
    r = _kpnb("run", "--preset", "smoke", "--out", str(tmp_path / "b"), "-p", "colour=red")
    assert r.returncode == 2 and "unknown parameter 'colour'" in r.stderr and "dataset_dir" in r.stderr
    assert not (tmp_path / "b").exists()
    r = _kpnb("run", "--preset", "smoke", "--out", str(tmp_path / "c"), "-p", "vq.nope=3")
    assert r.returncode == 2 and "vq.steps" in r.stderr
    r = _kpnb("run", "--preset", "smoke", "--out", str(tmp_path / "d"), "--only", "01,42")
    assert r.returncode == 2 and "42" in r.stderr
