"""Presets, run folders, metrics files and safe checkpoint files: the one place for each.

A run is one folder ``outputs/<run>/``::

    config.json          preset name + resolved settings + overrides
    notebooks/           the executed notebooks (papermill)
    metrics/<stem>.json  what each notebook measured (flat keys, + preset, seconds, torch_threads)
    figures/             PNG figures
    checkpoints/<stage>/ safetensors + JSON config per stage
    samples/             generated images
    dataset/             the synthetic dataset (unless ``dataset_dir`` points at real data)

Checkpoints are safetensors plus JSON. Nothing here unpickles a file: a legacy ``.pt``/``.ckpt`` is read
only through ``torch.load(weights_only=True)``, which refuses pickles that would run code.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping

# ---- presets ------------------------------------------------------------------------------------------
# One dict per preset, one section per stage. Notebooks take ``preset`` plus overrides ("vq.steps=100").
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "smoke": {
        "data": {"image_size": 32, "n_candidates": 240, "render_size": 64, "seed": 0, "val_frac": 0.15},
        "filter": {"use_clip": False},
        "vq": {"specs": ["f4"], "steps": 6, "batch_size": 8},
        "diffusion": {"steps": 6, "batch_size": 8},
        "estimator": {"steps": 6, "batch_size": 8},
        "clip": {"steps": 6, "batch_size": 8},
        "transformer": {"steps": 6, "batch_size": 8},
    },
    "cpu": {
        "data": {"image_size": 64, "n_candidates": 6000, "render_size": 256, "seed": 0, "val_frac": 0.1},
        "filter": {"use_clip": False},
        "vq": {"specs": ["f4", "f8", "f16"], "steps": 3000, "batch_size": 32},
        "diffusion": {"steps": 6000, "batch_size": 32},
        "estimator": {"steps": 3000, "batch_size": 32},
        "clip": {"steps": 2000, "batch_size": 64},
        "transformer": {"steps": 3000, "batch_size": 32},
    },
    "gpu": {
        "data": {"image_size": 256, "n_candidates": 60000, "render_size": 512, "seed": 0, "val_frac": 0.02},
        "filter": {"use_clip": True},
        "vq": {"specs": ["f4", "f8", "f16"], "steps": 200000, "batch_size": 16},
        "diffusion": {"steps": 400000, "batch_size": 32},
        "estimator": {"steps": 30000, "batch_size": 64},
        "clip": {"steps": 30000, "batch_size": 256},
        "transformer": {"steps": 400000, "batch_size": 16},
    },
}


class ConfigError(ValueError):
    """An unknown preset or parameter: says which, and lists the valid ones."""


def preset_config(preset: str, overrides: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """The settings of ``preset`` with ``overrides`` applied. Overrides use dotted keys ("vq.steps": 10);
    an unknown preset, section or key is refused with the list of valid ones, before any work."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[preset])
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if section not in cfg:
            raise ConfigError(f"unknown setting {key!r}; valid sections: {', '.join(cfg)}")
        if name not in cfg[section]:
            valid = ", ".join(f"{section}.{k}" for k in cfg[section])
            raise ConfigError(f"unknown setting {key!r}; valid settings of {section!r}: {valid}")
        old = cfg[section][name]
        if old is not None and not isinstance(value, type(old)) and not (
                isinstance(old, float) and isinstance(value, int)):
            raise ConfigError(f"setting {key!r} expects {type(old).__name__}, got {value!r}")
        cfg[section][name] = value
    return cfg


def parse_value(text: str) -> Any:
    """A command-line value: JSON when it parses (numbers, lists, true/false), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---- run folders --------------------------------------------------------------------------------------
SUBDIRS = ("notebooks", "metrics", "figures", "checkpoints", "samples")


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def default_run_dir(preset: str) -> Path:
    return repo_root() / "outputs" / f"{time.strftime('%Y%m%d-%H%M%S')}_{preset}"


def run_dir(path: str | Path, preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> Path:
    """Create (or open) a run folder. The first call writes ``config.json``; a later call with a different
    preset is refused, so two presets never mix in one run."""
    root = Path(path)
    for sub in SUBDIRS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    cfg_path = root / "config.json"
    if cfg_path.exists():
        existing = json.loads(cfg_path.read_text())
        if preset is not None and existing.get("preset") != preset:
            raise ConfigError(f"{cfg_path}: run was made with preset {existing.get('preset')!r}, not {preset!r}")
    elif preset is not None:
        write_json(cfg_path, {"preset": preset, "overrides": dict(overrides or {}),
                              "settings": preset_config(preset, overrides)})
    return root


def run_config(root: str | Path) -> dict[str, Any]:
    """The resolved settings of a run folder (its preset with its overrides)."""
    cfg = json.loads((Path(root) / "config.json").read_text())
    return preset_config(cfg["preset"], cfg.get("overrides"))


# ---- atomic files and metrics -------------------------------------------------------------------------
def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_metrics(root: str | Path, stem: str, metrics: Mapping[str, Any], *, preset: str, seconds: float) -> Path:
    """``<run>/metrics/<stem>.json``: flat keys, numbers/strings/null, plus preset, seconds, torch_threads.
    A value that could not be computed must be None with the reason under ``notes``."""
    import torch

    flat: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            raise TypeError(f"metric {k!r} is nested; use flat keys like '{k}.sub'")
        flat[k] = v
    flat.update(preset=preset, seconds=round(float(seconds), 2), torch_threads=torch.get_num_threads())
    path = Path(root) / "metrics" / f"{stem}.json"
    write_json(path, flat)
    return path


def read_metrics(root: str | Path, stem: str) -> dict[str, Any]:
    return json.loads((Path(root) / "metrics" / f"{stem}.json").read_text())


# ---- safe tensor files --------------------------------------------------------------------------------
class UnsafeFileError(ValueError):
    """A weights file that could run code when loaded (a pickle with globals) was refused."""


def save_tensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None) -> None:
    """safetensors, written atomically. ``metadata`` (JSON-able) is stored in the file header."""
    from safetensors.torch import save

    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"kpnb": json.dumps(metadata or {}, default=_json_default)}
    atomic_write_bytes(path, save(flat, metadata=meta))


def load_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read tensors and metadata. ``.safetensors`` directly; any other file only through
    ``torch.load(weights_only=True)`` - a pickle that would import or call anything is refused."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(8)
    if path.suffix == ".safetensors" or (len(head) == 8 and int.from_bytes(head, "little") < 100_000_000
                                          and not head.startswith(b"PK") and head[:1] != b"\x80"):
        from safetensors import safe_open

        try:
            out = {}
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("kpnb", "{}"))
                for k in f.keys():
                    out[k] = f.get_tensor(k)
            return out, meta
        except Exception as e:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UnsafeFileError(
            f"{path}: refused - this pickle is not plain tensors and containers, and loading it could run "
            f"code ({str(e).splitlines()[0][:200]})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj, {}


# ---- the notebook side ---------------------------------------------------------------------------------
class NotebookRun:
    """What every notebook does first: resolve its preset and run folder, time itself, write its metrics.

    ``run_dir=""`` (a person clicking through JupyterLab) means ``outputs/notebooks_<preset>/``, the same
    folder for every notebook, so 02 finds what 01 wrote; ``kpnb run`` passes its own folder.
    """

    def __init__(self, stem: str, preset: str, run_dir_: str = "", overrides: Mapping[str, Any] | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.stem = stem
        self.preset = preset
        self.cfg = preset_config(preset, overrides)
        self.root = run_dir(run_dir_ or repo_root() / "outputs" / f"notebooks_{preset}", preset, overrides)
        self.t0 = time.time()

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def figure(self, name: str) -> Path:
        return self.path("figures", f"{self.stem}_{name}.png")

    def checkpoints(self, stage: str) -> Path:
        p = self.root / "checkpoints" / stage
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def finish(self, metrics: Mapping[str, Any]) -> Path:
        path = write_metrics(self.root, self.stem, metrics, preset=self.preset, seconds=self.seconds)
        print(f"metrics written to {path}")
        return path
