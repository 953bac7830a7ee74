"""Files written whole or not at all: atomic writes, JSON and metrics files, safetensors.

Nothing here unpickles a file: a legacy ``.pt``/``.ckpt`` is read only through
``torch.load(weights_only=True)``, which refuses pickles that would run code."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


# ---- atomic files and metrics -------------------------------------------------------------------------
def fsync_file(path: str | Path) -> None:
    """Flush a written file's contents to the disk."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk, where the system lets a folder be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every system opens folders; the rename is done either way
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class DiskFullError(OSError):
    """A write that met a full disk (or a quota): names the file, the bytes it needed and the space left."""


_FULL = {errno.ENOSPC, errno.EDQUOT}


def _disk_full(path: Path, tmp: Path, size: int | None, err: OSError) -> DiskFullError:
    written = tmp.stat().st_size if tmp.exists() else 0
    need = f"{size:,} bytes" if size is not None else f"more than the {written:,} bytes written so far"
    free = shutil.disk_usage(path.parent).free
    return DiskFullError(err.errno, f"no space left on the device: writing {path} needs {need}, {free:,} bytes are "
                         f"free in {path.parent}. Nothing already complete was touched (the temporary file is "
                         f"removed): free some space and run the same command again", str(path))


@contextmanager
def naming_full_disk(path: str | Path, size: int | None = None) -> Iterator[None]:
    """A full disk met in the block (a file appended to in place) raises :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.errno in _FULL and not isinstance(e, DiskFullError):
            raise _disk_full(Path(path), Path(path), size, e) from e
        raise


def reserve(path: str | Path, size: int) -> None:
    """Reserve ``size`` bytes for the file at ``path`` where the system can (``posix_fallocate``), so that a full
    disk is an error here and not a crash (SIGBUS) when a memory map of the file is written later. Call it after
    the file is created (a memory map's ``w+`` truncates)."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno in _FULL:
            raise
        # a file system without fallocate (EOPNOTSUPP, EINVAL): the writes themselves meet a full disk
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


@contextmanager
def atomic_path(path: str | Path, tmp: str | Path | None = None, *, size: int | None = None) -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write: when the block ends without an error the file
    is fsynced and renamed to ``path`` and the folder fsynced, so a crash never leaves half a file; after an
    error it is deleted. ``tmp``: the temporary name (the caller creates the file); default a new
    ``.<name>.<random>.tmp``, made by :func:`tempfile.mkstemp` (so readable by its owner only). ``size``: the
    bytes the file will hold, for the error message (a memory-mapped writer also calls :func:`reserve`).

    Every write of the package goes through here: a full disk (ENOSPC, or a quota) raises
    :class:`DiskFullError` naming ``path``, the bytes it needed and the space left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = name
    tmp = Path(tmp)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        full = _disk_full(path, tmp, size, e) if isinstance(e, OSError) and e.errno in _FULL else None
        tmp.unlink(missing_ok=True)
        if full is not None:
            raise full from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`: a crash never leaves half a file, a full disk
    raises :class:`DiskFullError` naming the file and the bytes."""
    with atomic_path(path, size=len(data)) as tmp:
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)


def file_sha1(path: str | Path) -> str:
    """The sha1 hex digest of a file's bytes, read a MiB at a time."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
