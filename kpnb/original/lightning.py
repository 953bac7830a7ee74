"""Read a PyTorch Lightning checkpoint (``.ckpt``) without running code from it.

:func:`read_lightning_checkpoint` gives the ``state_dict`` and Lightning's bookkeeping of a file written by
``torch.save``; :mod:`kpnb.original.ldm` maps what it reads onto kpnb's models.

A ``.ckpt`` is a pickle, and unpickling can import and call anything. The file is first disassembled without
running it (``pickletools``) to list every global it names. Then:

* tensors, storages and torch's rebuild functions, ``collections.OrderedDict``/``Counter``, ``_codecs.encode``
  and the ``set``/``bytearray``/``complex`` builtins: handed to ``torch.load(weights_only=True)``, which
  judges the ``torch.*`` names itself;
* numpy scalars (``numpy._core.multiarray.scalar``, ``numpy.dtype``): allowed (they rebuild a number from
  bytes and call nothing else);
* Lightning metadata - anything under ``pytorch_lightning.``, ``lightning.``, ``lightning_fabric.``, and the
  ``SetupCallback``/``ImageLogger``/``CUDACallback`` classes of taming's and ldm's ``main.py`` (callback
  classes used as keys of ``callbacks``, hyper-parameter holders): replaced by an inert
  :class:`LightningPlaceholder` subclass that only stores what it is given. The real class is never imported
  or called. Lightning's ``AttributeDict`` becomes a plain ``dict``;
* **anything else** (``os.system``, ``builtins.eval``, ``subprocess``, an unknown class, ...): the file is
  **refused** with :class:`kpnb.core.files.UnsafeFileError` naming the file and the globals, before anything is
  unpickled. ``torch.load(weights_only=True)`` then remains a second line of defence for the rest.
"""
from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import io
import pickle
import pickletools
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kpnb.core.files import UnsafeFileError


class CheckpointImportError(ValueError):
    """A checkpoint whose content kpnb cannot read as tensors or represent in its models."""


class LightningPlaceholder:
    """Inert stand-in for a class named in a checkpoint's Lightning metadata (a callback class used as a dict
    key, a hyper-parameter holder, ...). It never imports or calls the class it replaces: creating one only
    stores the arguments (``args``, ``kwargs``) and unpickled state (``state``). ``original`` is the name."""

    original = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "LightningPlaceholder":
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<inert placeholder for {self.original}>"


@functools.lru_cache(maxsize=None)
def _placeholder(name: str) -> type:
    return type(name.rsplit(".", 1)[-1], (LightningPlaceholder,),
                {"original": name, "__module__": f"{__name__}.placeholders", "__doc__": f"Placeholder for {name}."})


PLACEHOLDER_PREFIXES = ("pytorch_lightning.", "lightning.", "lightning_fabric.")
PLACEHOLDER_NAMES = frozenset({"main.SetupCallback", "main.ImageLogger", "main.CUDACallback"})
DICT_NAMES = frozenset({"pytorch_lightning.utilities.parsing.AttributeDict",
                        "lightning.pytorch.utilities.parsing.AttributeDict",
                        "lightning_fabric.utilities.data.AttributeDict",
                        "lightning.fabric.utilities.data.AttributeDict"})
PLAIN_NAMES = frozenset({"collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.set",
                         "builtins.bytearray", "builtins.complex"})
NUMPY_NAMES = frozenset({"numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype"})


def _is_placeholder(name: str) -> bool:
    return name not in DICT_NAMES and (name.startswith(PLACEHOLDER_PREFIXES) or name in PLACEHOLDER_NAMES)


def _numpy_globals() -> list[tuple[Any, str]]:
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    out: list[tuple[Any, str]] = [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"),
                                  (np.dtype, "numpy.dtype")]
    # a dtype is rebuilt as an instance of its class (np.dtypes.Float64DType ...), which BUILD must accept
    for n in dir(getattr(np, "dtypes", None) or ()):
        c = getattr(np.dtypes, n)
        if isinstance(c, type) and issubclass(c, np.dtype):
            out.append((c, f"numpy.dtypes.{n}"))
    return out


def _global_name(module: str, name: str) -> str:
    """``module.name`` as Python 3 resolves it (protocol-2 pickles say ``__builtin__`` for ``builtins``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _globals_in(stream: io.BufferedIOBase) -> list[str]:
    """Globals named by one pickle in ``stream`` (read up to its STOP), found by disassembly only."""
    found, strings = [], []
    for op, arg, _ in pickletools.genops(stream):
        if op.name in ("GLOBAL", "INST"):
            module, name = str(arg).split(" ", 1)
            found.append(_global_name(module, name))
        elif op.name == "STACK_GLOBAL":  # torch.save writes protocol 2 (GLOBAL); this is never accepted
            guess = _global_name(*strings[-2:]) if len(strings) >= 2 else "?"
            found.append(f"{guess} (by STACK_GLOBAL)")
        elif op.name.startswith("EXT"):
            found.append(f"<copyreg extension {arg}>")
        elif isinstance(arg, str) and ("UNICODE" in op.name or "STRING" in op.name):
            strings.append(arg)
    return found


def scan_pickle_globals(path: str | Path) -> list[str]:
    """Every global (``module.name``) the pickle(s) of a ``torch.save`` file would import, sorted; nothing is
    unpickled. Handles the zip format (each ``*.pkl`` record) and the legacy format (its leading pickles)."""
    path = Path(path)
    names: set[str] = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                for rec in z.namelist():
                    if rec.endswith(".pkl"):
                        names.update(_globals_in(io.BytesIO(z.read(rec))))
        else:
            with open(path, "rb") as f:
                # legacy torch.save: magic number, protocol, sys info, the object, storage keys; raw bytes after
                for i in range(5):
                    try:
                        names.update(_globals_in(f))
                    except Exception:  # noqa: BLE001 - past the pickles (or not a pickle at all)
                        if i == 0:
                            raise
                        break
    except Exception as e:  # noqa: BLE001
        raise UnsafeFileError(f"{path}: refused - not a readable PyTorch checkpoint "
                              f"({type(e).__name__}: {str(e)[:200]})") from e
    return sorted(names)


@dataclass
class LightningCheckpoint:
    """What :func:`load_lightning_checkpoint` read: the ``state_dict`` (name -> tensor), Lightning's
    bookkeeping (``meta``: epoch, global_step, pytorch-lightning_version, the other top-level keys) and
    the globals that were replaced by inert placeholders."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    placeholders: list[str]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

def _weights_only_load(path: Path, allow: list[Any]) -> Any:
    """torch.load(weights_only=True) with the extra named globals; memory-mapped for zip files (a released
    .ckpt also holds optimizer state we never touch), read normally if mapping fails."""
    err: Exception | None = None
    for mmap in ([True, False] if zipfile.is_zipfile(path) else [False]):
        try:
            with torch.serialization.safe_globals(allow) if allow else contextlib.nullcontext():
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:  # the weights-only unpickler said no: no point in retrying
            err = e
            break
        except Exception as e:  # noqa: BLE001 - e.g. a file that cannot be memory-mapped; try reading it
            err = e
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()
    hit = re.search(r"WeightsUnpickler error: (.*)", text)
    msg = (hit.group(1) if hit else text.splitlines()[0] if text else type(err).__name__).split(" Please use")[0]
    raise UnsafeFileError(f"{path}: refused by torch.load(weights_only=True) - {msg[:300]}") from err


def read_lightning_checkpoint(path: str | Path) -> LightningCheckpoint:
    """Read a PyTorch Lightning ``.ckpt`` (or any ``torch.save`` dict of tensors) without running code from
    it: see the module docstring for what is allowed, placeholdered and refused. A file that holds just a
    state dict (no ``state_dict`` key) is accepted too. Raises :class:`kpnb.core.files.UnsafeFileError` (naming the
    file and the globals) for a pickle that would import or call anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    found = scan_pickle_globals(path)
    bad = [g for g in found if not (g.startswith("torch.") or g in PLAIN_NAMES or g in NUMPY_NAMES
                                    or g in DICT_NAMES or _is_placeholder(g))]
    if bad:
        raise UnsafeFileError(
            f"{path}: refused - unpickling it would import or call {', '.join(bad)}. kpnb reads only tensors, "
            f"plain containers, numpy scalars and Lightning metadata from a checkpoint; nothing in the file was "
            f"run. Use a file from a source you trust, or convert it to safetensors where it is trusted.")
    placeholders = [g for g in found if _is_placeholder(g)]
    allow: list[Any] = [(_placeholder(g), g) for g in placeholders]
    allow += [(dict, g) for g in found if g in DICT_NAMES]
    if any(g in NUMPY_NAMES for g in found):
        allow += _numpy_globals()
    if allow and not torch.__version__ >= (2, 6):  # named safe globals ((object, "module.name")) came in 2.6
        raise CheckpointImportError(
            f"{path}: this checkpoint names {', '.join(sorted({n for _, n in allow if n in found}))}; reading those "
            f"without running them (named safe globals) needs torch >= 2.6 (this is torch {torch.__version__})")
    obj = _weights_only_load(path, allow)
    if not isinstance(obj, dict):
        raise CheckpointImportError(f"{path}: expected a Lightning checkpoint (a dict), got {type(obj).__name__}")
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, dict):
        raise CheckpointImportError(f"{path}: 'state_dict' is a {type(sd).__name__}, not a dict of tensors")
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointImportError(f"{path}: state_dict entries that are not tensors: {', '.join(not_tensors[:5])}")
    meta = {k: obj[k] for k in ("epoch", "global_step", "pytorch-lightning_version") if k in obj}
    if "state_dict" in obj:
        meta["other_keys"] = sorted(str(k) for k in obj if k not in ("state_dict", *meta))
    return LightningCheckpoint(path, dict(sd), meta, placeholders, obj)
