"""Checkpoints of the one training loop: safetensors weights plus a JSON of step, config, optimiser and RNG state,
written atomically by rank 0; reading them back, resuming, and forking one into a new folder.

A folder keeps its newest ``keep`` complete checkpoints (``runtime.keep_checkpoints``), so that a damaged newest
one leaves an older one to go on from. Each JSON records its tensor file's size and sha256 (the JSON is written
after the tensors, so it describes the finished file). Choosing a checkpoint checks the newest's size (always,
cheap) and, when it is loaded, its sha256; a damaged one (missing, truncated, changed, unreadable) is named with
the reason and the previous one is used. Checkpoints written before these fields existed load unchecked."""
from __future__ import annotations

import base64
import hashlib
import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from kpnb.core import files
from kpnb.core import progress as kprogress
from kpnb.core.runtime import current

CKPT_RE = re.compile(r"^ckpt-(\d{7,})\.json$")
_FILE_RE = re.compile(r"^ckpt-(\d{7,})\.(json|safetensors)$")


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


def _newest_first(ckpt_dir: Path) -> list[Path]:
    """The JSON files of ``ckpt_dir``'s complete checkpoints, newest first. A checkpoint is complete once its
    JSON exists: the JSON is written after the tensors."""
    if not ckpt_dir.is_dir():
        return []
    found = sorted(((int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := CKPT_RE.match(p.name))), reverse=True)
    return [p for _, p in found]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _damage(js: Path, *, full: bool) -> tuple[Path, str] | None:
    """Why the checkpoint of ``js`` cannot be used, as (the damaged file, the reason); None when it can. The
    tensor file's size is checked against the one its JSON records, and with ``full`` its sha256 too (a read of
    the whole file). A JSON without the record (written before it existed) can only show a missing file."""
    st = js.with_suffix(".safetensors")
    try:
        info = json.loads(js.read_text())
    except (OSError, ValueError) as e:
        return js, f"unreadable JSON ({e})"
    if not isinstance(info, dict):
        return js, "not a checkpoint JSON"
    if not st.is_file():
        return st, "the tensor file is missing"
    rec = info.get("tensors")
    if not isinstance(rec, Mapping) or not isinstance(rec.get("bytes"), int):
        return None
    size = st.stat().st_size
    if size != rec["bytes"]:
        return st, f"{size:,} bytes where {rec['bytes']:,} were written (truncated or overwritten)"
    if full and _file_sha256(st) != rec.get("sha256"):
        return st, "its sha256 differs from the one recorded when it was written (its bytes changed)"
    return None


def _say(text: str) -> None:
    """A message for the person running (the notebook's or console's output, and a headless run's log)."""
    print(text)
    kprogress.note(text)


def _all_damaged(ckpt_dir: Path, damaged: list[tuple[Path, str]]) -> CheckpointError:
    listing = "; ".join(f"{p} ({why})" for p, why in damaged)
    return CheckpointError(f"{ckpt_dir}: every checkpoint is damaged - {listing}. Restore the files, or delete the "
                           f"folder to train afresh")


class _Damaged(Exception):
    def __init__(self, file: Path, reason: str):
        super().__init__(file, reason)
        self.file, self.reason = file, reason


def _first_usable(ckpt_dir: Path, use: Callable[[Path], Any]) -> Any:
    """``use(json)`` of the newest checkpoint it accepts; one it refuses with :class:`_Damaged` is named with the
    reason and passed over. None when the folder holds no complete checkpoint; CheckpointError, naming them all,
    when every one is damaged."""
    damaged: list[tuple[Path, str]] = []
    for js in _newest_first(ckpt_dir):
        try:
            got = use(js)
        except _Damaged as e:
            _say(f"damaged checkpoint {e.file}: {e.reason}; passed over")
            damaged.append((e.file, e.reason))
            continue
        if damaged:
            _say(f"going on from the previous complete checkpoint, {js}")
        return got
    if damaged:
        raise _all_damaged(ckpt_dir, damaged)
    return None


def latest_checkpoint(ckpt_dir: str | Path, *, verify: bool = False) -> Path | None:
    """The JSON file of the newest usable checkpoint in ``ckpt_dir`` (None when it holds no complete one). Its
    tensor file is checked against the size its JSON records, and with ``verify`` against the sha256 too; a
    damaged checkpoint is named with the reason and the previous one taken. CheckpointError, naming them all,
    when every checkpoint is damaged."""
    def checked(js: Path) -> Path:
        bad = _damage(js, full=verify)
        if bad is not None:
            raise _Damaged(*bad)
        return js
    return _first_usable(Path(ckpt_dir), checked)


def fork_checkpoint(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Start ``dst_dir`` from the latest checkpoint of ``src_dir`` (and its metrics.csv), so that training
    into ``dst_dir`` goes on from there while ``src_dir`` stays as it is. A ``dst_dir`` that already has a
    checkpoint is left alone (it is being, or was, trained further). Returns the checkpoint JSON used."""

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    have = latest_checkpoint(dst_dir)
    if have is not None:
        return have
    last = latest_checkpoint(src_dir, verify=True)  # a damaged copy would leave dst_dir nothing to fall back on
    if last is None:
        raise CheckpointError(f"{src_dir}: no checkpoint to start {dst_dir} from")
    dst_dir.mkdir(parents=True, exist_ok=True)
    if (src_dir / "metrics.csv").exists():
        shutil.copyfile(src_dir / "metrics.csv", dst_dir / "metrics.csv")
    shutil.copyfile(last.with_suffix(".safetensors"), dst_dir / last.with_suffix(".safetensors").name)
    files.atomic_write_bytes(dst_dir / last.name, last.read_bytes())  # the JSON last: it marks completeness
    return dst_dir / last.name


def _remove_temp_files(ckpt_dir: Path) -> None:
    """Temporary files left by a killed write."""
    for p in ckpt_dir.iterdir():
        if p.name.startswith(".") and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)


def _prune(ckpt_dir: Path, newest: int, keep: int) -> None:
    """Keep the ``keep`` newest usable checkpoints up to step ``newest`` (the one just written, so only its size
    is checked again; older ones are hashed) and remove the rest: older ones, damaged ones, incomplete ones (a
    tensor file without its JSON) and any past ``newest`` (from a run this one started over from: a fresh start,
    or a fallback past a damaged checkpoint)."""
    _remove_temp_files(ckpt_dir)
    steps = sorted({int(m.group(1)) for p in ckpt_dir.iterdir() if (m := _FILE_RE.match(p.name))}, reverse=True)
    kept = 0
    for step in steps:
        st, js = _ckpt_paths(ckpt_dir, step)
        if step <= newest and js.exists() and kept < keep:
            bad = _damage(js, full=step != newest)
            if bad is None:
                kept += 1
                continue
            _say(f"damaged checkpoint {bad[0]}: {bad[1]}; removed")
        # the JSON first: a kill in between leaves an incomplete checkpoint, not a damaged one
        js.unlink(missing_ok=True)
        st.unlink(missing_ok=True)


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
                    config: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None, *,
                    keep: int | None = None) -> Path:
    """Write ``ckpt-<step>`` (tensors, then the JSON with the tensor file's size and sha256) atomically, then keep
    the ``keep`` newest usable checkpoints up to it and remove the others. A damaged checkpoint of the same step
    is replaced (``keep`` None: the current runtime's ``keep_checkpoints``). Refuses to save non-finite weights, so
    a diverged model never replaces a good checkpoint."""
    keep = current().keep_checkpoints if keep is None else keep
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep (runtime.keep_checkpoints) must be a whole number >= 1, got {keep!r}")
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
    js_path.unlink(missing_ok=True)  # one of this step written before is incomplete until its new JSON is in
    files.save_tensors(st_path, tensors, {"step": step})
    record = {"file": st_path.name, "bytes": st_path.stat().st_size, "sha256": _file_sha256(st_path)}
    files.write_json(js_path, {"step": step, "config": dict(config or {}), "modules": list(modules),
                              "optimizers": optim_info, "rng": _rng_state(), "tensors": record, **dict(extra or {})})
    _prune(ckpt_dir, step, keep)
    return js_path


def read_checkpoint_info(path: str | Path) -> dict[str, Any]:
    """The JSON half of a checkpoint (config, step, ...) of a folder's latest checkpoint or a given file."""
    path = Path(path)
    if path.is_dir():
        js = latest_checkpoint(path)
        if js is None:
            raise CheckpointError(f"{path}: no complete checkpoint (ckpt-<step>.json + .safetensors) here")
    else:
        js = path if path.suffix == ".json" else path.with_suffix(".json")
        if not js.exists():
            raise CheckpointError(f"{path}: no checkpoint JSON next to it")
    try:
        return json.loads(js.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{js}: unreadable checkpoint JSON ({e})") from e


@dataclass
class Checkpoint:
    """A checkpoint read back: its tensors, its JSON info ({} for a bare tensor file), and its files."""
    tensors: dict[str, torch.Tensor]
    info: dict[str, Any]
    path: Path                 # the tensor file
    json: Path | None


def _read_one(st: Path, js: Path | None) -> Checkpoint:
    """The checkpoint of tensor file ``st`` and its JSON ``js`` (None: a bare tensor file, read unchecked),
    checked against the JSON's size and sha256; :class:`_Damaged` when it fails them or cannot be read."""
    if js is None:
        return Checkpoint(files.load_tensors(st)[0], {}, st, None)
    bad = _damage(js, full=True)
    if bad is not None:
        raise _Damaged(*bad)
    try:
        tensors, _ = files.load_tensors(st)
    except (OSError, ValueError) as e:
        raise _Damaged(st, f"unreadable ({e})") from e
    return Checkpoint(tensors, json.loads(js.read_text()), st, js)


def read_checkpoint(path: str | Path, *, missing_ok: bool = False) -> Checkpoint | None:
    """The checkpoint of a folder (its newest usable one) or of a file (a checkpoint JSON, or a tensor file with
    or without its JSON), its tensor file checked against the size and sha256 its JSON records. In a folder a
    damaged checkpoint is named with the reason and the previous one read; CheckpointError names them all when
    every one is damaged, or says the folder has none (None instead with ``missing_ok``). A named file that is
    damaged is refused with the reason. Never unpickles: a ``.pt`` file goes through
    ``torch.load(weights_only=True)`` and a code-running pickle is refused."""
    path = Path(path)
    if not path.is_dir():
        if path.suffix == ".json":
            st, js = path.with_suffix(".safetensors"), path
        else:
            st, js = path, (path.with_suffix(".json") if path.with_suffix(".json").exists() else None)
        try:
            return _read_one(st, js)
        except _Damaged as e:
            raise CheckpointError(f"damaged checkpoint {e.file}: {e.reason}") from None
    ck = _first_usable(path, lambda js: _read_one(js.with_suffix(".safetensors"), js))
    if ck is not None or missing_ok:
        return ck
    raise CheckpointError(f"{path}: no complete checkpoint (ckpt-<step>.json + .safetensors) here")


def apply_checkpoint(ck: Checkpoint, modules: Mapping[str, nn.Module], *, strict: bool = True,
                     optimizers: Mapping[str, torch.optim.Optimizer] | None = None) -> None:
    """Load ``ck``'s weights into ``modules`` (only the modules named, so a notebook can take just e.g.
    ``"ema"``) and its optimiser state into ``optimizers``."""
    st, tensors, info = ck.path, ck.tensors, ck.info
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
            raise CheckpointError(f"{ck.json}: no optimiser {name!r} saved")
        opt.load_state_dict(_unflatten_optimizer(name, tensors, info["optimizers"][name]))


def load_trained(ckpt_dir: str | Path, key: str, build: Callable[[Any], nn.Module], *, module: str = "model",
                 what: str | None = None) -> nn.Module:
    """The model of a checkpoint folder (its newest usable checkpoint, :func:`read_checkpoint`) or file, in eval
    mode, on the current runtime's device (:func:`kpnb.core.runtime.current`): ``build`` makes it from the saved
    ``config[key]``, then the weights of ``module`` are loaded (checkpoints hold CPU tensors, so any device can
    load any checkpoint). A checkpoint without ``config[key]`` is refused as not being a ``what`` checkpoint."""
    ck = read_checkpoint(ckpt_dir)
    if ck.json is None:
        raise CheckpointError(f"{ckpt_dir}: no checkpoint JSON next to it")
    cfg = ck.info.get("config", {})
    if key not in cfg:
        raise CheckpointError(f"{ckpt_dir}: not a {what or key} checkpoint (no {key!r} config in its JSON)")
    model = build(cfg[key])
    apply_checkpoint(ck, {module: model})
    return model.to(current().device).eval()


def load_checkpoint(path: str | Path, modules: Mapping[str, nn.Module], *, strict: bool = True,
                    optimizers: Mapping[str, torch.optim.Optimizer] | None = None) -> dict[str, Any]:
    """Load weights (and optimiser state when given) into ``modules`` from a checkpoint folder (its newest usable
    checkpoint) or file, as :func:`read_checkpoint` chooses and checks it. Only the modules named are loaded.
    Returns the checkpoint's JSON info ({} for a bare tensor file)."""
    ck = read_checkpoint(path)
    apply_checkpoint(ck, modules, strict=strict, optimizers=optimizers)
    return ck.info
