"""Checkpoints of the one training loop: safetensors weights plus a JSON of step, config, optimiser and RNG state,
written atomically by rank 0; reading them back, resuming, and forking one into a new folder."""
from __future__ import annotations

import base64
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from kpnb.core import files
from kpnb.core.runtime import current

CKPT_RE = re.compile(r"^ckpt-(\d{7,})\.json$")


class NonFiniteLossError(FloatingPointError):
    """A loss (or, at checkpoint time, a weight) became NaN or infinite; says which and at what step."""


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed or loaded (names the file and the reason)."""


# ---- RNG state (JSON-able) ----------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(state["torch"])), dtype=torch.uint8))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8) for s in state["cuda"]])


# ---- checkpoint files ---------------------------------------------------------------------------------
def _ckpt_paths(ckpt_dir: Path, step: int) -> tuple[Path, Path]:
    stem = ckpt_dir / f"ckpt-{step:07d}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The JSON file of the newest complete checkpoint in ``ckpt_dir`` (None when there is none). A
    checkpoint is complete once its JSON exists: the JSON is written after the tensors."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name)))
    for _, p in reversed(found):
        if p.with_suffix(".safetensors").exists():
            return p
    return None


def fork_checkpoint(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Start ``dst_dir`` from the latest checkpoint of ``src_dir`` (and its metrics.csv), so that training
    into ``dst_dir`` goes on from there while ``src_dir`` stays as it is. A ``dst_dir`` that already has a
    checkpoint is left alone (it is being, or was, trained further). Returns the checkpoint JSON used."""

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    have = latest_checkpoint(dst_dir)
    if have is not None:
        return have
    last = latest_checkpoint(src_dir)
    if last is None:
        raise CheckpointError(f"{src_dir}: no checkpoint to start {dst_dir} from")
    dst_dir.mkdir(parents=True, exist_ok=True)
    if (src_dir / "metrics.csv").exists():
        shutil.copyfile(src_dir / "metrics.csv", dst_dir / "metrics.csv")
    shutil.copyfile(last.with_suffix(".safetensors"), dst_dir / last.with_suffix(".safetensors").name)
    files.atomic_write_bytes(dst_dir / last.name, last.read_bytes())  # the JSON last: it marks completeness
    return dst_dir / last.name


def _clean_dir(ckpt_dir: Path, keep_step: int | None) -> None:
    """Remove temporary files left by a killed write, and every checkpoint other than ``keep_step``."""
    for p in ckpt_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
        m = re.match(r"^ckpt-(\d{7,})\.(json|safetensors)$", p.name)
        if m and keep_step is not None and int(m.group(1)) != keep_step:
            p.unlink(missing_ok=True)


def _flatten_optimizer(name: str, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim/{name}/{idx}/{k}"] = v
            else:
                plain.setdefault(str(idx), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "state": plain}


def _unflatten_optimizer(name: str, tensors: Mapping[str, torch.Tensor], info: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    prefix = f"optim/{name}/"
    for key, v in tensors.items():
        if key.startswith(prefix):
            idx, k = key[len(prefix):].split("/", 1)
            state.setdefault(int(idx), {})[k] = v
    for idx, st in info["state"].items():
        state.setdefault(int(idx), {}).update(st)
    groups = [dict(g) for g in info["param_groups"]]
    for g in groups:  # JSON turned tuples into lists; optimisers unpack them either way, but keep them tidy
        for k, v in g.items():
            if isinstance(v, list) and k != "params":
                g[k] = tuple(v)
    return {"state": state, "param_groups": groups}


def save_checkpoint(ckpt_dir: str | Path, step: int, modules: Mapping[str, nn.Module],
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
                    config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``ckpt-<step>`` (tensors, then JSON) atomically and remove older checkpoints. Refuses to save
    non-finite weights, so a diverged model never replaces a good checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise NonFiniteLossError(f"step {step}: weight {name}.{k} is not finite; checkpoint not written, "
                                         f"the previous one in {ckpt_dir} is kept")
            tensors[f"module/{name}/{k}"] = v.detach().cpu().clone()  # clone: tied weights must not share
    optim_info = {}
    for name, opt in (optimizers or {}).items():
        t, info = _flatten_optimizer(name, opt)
        tensors.update({k: v.detach().cpu().clone() for k, v in t.items()})
        optim_info[name] = info
    st_path, js_path = _ckpt_paths(ckpt_dir, step)
    files.save_tensors(st_path, tensors, {"step": step})
    files.write_json(js_path, {"step": step, "config": dict(config or {}), "modules": list(modules),
                              "optimizers": optim_info, "rng": _rng_state(), **dict(extra or {})})
    _clean_dir(ckpt_dir, keep_step=step)
    return js_path


def _resolve(path: str | Path) -> tuple[Path, Path | None]:
    """(tensor file, JSON file or None) for a checkpoint folder, a ckpt JSON, or a tensor file."""
    path = Path(path)
    if path.is_dir():
        js = latest_checkpoint(path)
        if js is None:
            raise CheckpointError(f"{path}: no complete checkpoint (ckpt-<step>.json + .safetensors) here")
        return js.with_suffix(".safetensors"), js
    if path.suffix == ".json":
        return path.with_suffix(".safetensors"), path
    js = path.with_suffix(".json")
    return path, (js if js.exists() else None)


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The JSON half of a checkpoint (config, step, ...) of a folder's latest checkpoint or a given file."""
    _, js = _resolve(path)
    if js is None:
        raise CheckpointError(f"{path}: no checkpoint JSON next to it")
    try:
        return json.loads(js.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{js}: unreadable checkpoint JSON ({e})") from e


def load_trained(ckpt_dir: str | Path, key: str, build: Callable[[Any], nn.Module], *, module: str = "model",
                 what: str | None = None) -> nn.Module:
    """The model of a checkpoint folder (its latest checkpoint) or file, in eval mode, on the current runtime's
    device (:func:`kpnb.core.runtime.current`): ``build`` makes it from the saved ``config[key]``, then the weights
    of ``module`` are loaded (checkpoints hold CPU tensors, so any device can load any checkpoint). A checkpoint without ``config[key]``
    is refused as not being a ``what`` checkpoint."""
    cfg = read_checkpoint_info(ckpt_dir).get("config", {})
    if key not in cfg:
        raise CheckpointError(f"{ckpt_dir}: not a {what or key} checkpoint (no {key!r} config in its JSON)")
    model = build(cfg[key])
    load_checkpoint(ckpt_dir, {module: model})
    return model.to(current().device).eval()


def load_checkpoint(path: str | Path, modules: Mapping[str, nn.Module], *, strict: bool = True,
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None) -> dict[str, Any]:
    """Load weights (and optimiser state when given) into ``modules`` from a checkpoint folder (its latest
    checkpoint) or file. Only the modules named are loaded, so a notebook can take just e.g. ``"ema"``.
    Returns the checkpoint's JSON info ({} for a bare tensor file). Never unpickles: a ``.pt`` file goes
    through ``torch.load(weights_only=True)`` and a code-running pickle is refused."""
    st, js = _resolve(path)
    tensors, _ = files.load_tensors(st)
    info = read_checkpoint_info(js) if js is not None else {}
    has_prefix = any(k.startswith("module/") for k in tensors)
    for name, m in modules.items():
        if has_prefix:
            prefix = f"module/{name}/"
            sd = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not sd:
                saved = sorted({k.split("/")[1] for k in tensors if k.startswith("module/")})
                raise CheckpointError(f"{st}: no module {name!r} in this checkpoint (it has: {', '.join(saved)})")
        else:
            sd = tensors  # a bare state dict file (e.g. third-party weights)
        try:
            m.load_state_dict(sd, strict=strict)
        except RuntimeError as e:
            raise CheckpointError(f"{st}: weights of {name!r} do not fit the model ({e})") from e
    for name, opt in (optimizers or {}).items():
        if name not in info.get("optimizers", {}):
            raise CheckpointError(f"{js}: no optimiser {name!r} saved")
        opt.load_state_dict(_unflatten_optimizer(name, tensors, info["optimizers"][name]))
    return info
