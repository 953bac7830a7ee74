"""The files of a resumable job that writes one result per shard - ``kpnb data pack``'s shards
(:mod:`kpnb.data.shards`) and ``kpnb data filter``'s per-shard results (:mod:`kpnb.data.stream_filter`).

Such a job keeps, per shard index i, a payload ``<prefix>-<i:06d><payload>`` and beside it a done-record
``<prefix>-<i:06d>.json`` (written last, atomically), which holds the payload's size under ``bytes``. A shard
counts as done when its record has the expected values and the payload the recorded size. A killed job leaves
temporary files of :func:`kpnb.core.files.atomic_path` (``.<file name>.<random>.tmp``), which a rerun deletes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from kpnb.data.folder import DataError


@dataclass(frozen=True)
class ShardFiles:
    """The names and format of one kind of per-shard job folder."""

    prefix: str     # file names start "<prefix>-<index:06d>"
    payload: str    # the suffix of the file the done-record describes, e.g. ".tar"
    format: str     # the format tag of the job's JSON files
    delay_env: str  # test hook: an environment variable whose seconds slow the job down (so it can be killed)

    def name(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}"

    def delay(self) -> float:
        """The test hook's seconds (0 when the variable is unset or empty)."""
        return float(os.environ.get(self.delay_env, 0) or 0)

    def done_record(self, folder: Path, index: int, expect: Mapping[str, Any]) -> dict[str, Any] | None:
        """Shard ``index``'s done-record when it has every value of ``expect`` and its payload the recorded
        size, else None (no record, an unreadable one, or a payload missing or of another size)."""
        name = self.name(index)
        try:
            rec = json.loads((folder / f"{name}.json").read_text())
            size = (folder / f"{name}{self.payload}").stat().st_size
        except (OSError, ValueError):
            return None
        if not isinstance(rec, dict) or rec.get("bytes") != size or any(rec.get(k) != v for k, v in expect.items()):
            return None
        return rec

    def remove_temps(self, folder: Path, owns: Callable[[int], bool] | None = None) -> list[str]:
        """Delete the ``.<prefix>-*.tmp`` files a killed job left (:func:`kpnb.core.files.atomic_path`'s
        temporaries); with ``owns``, only those of the shard indices it accepts. Returns the names deleted."""
        numbered = re.compile(rf"\.{re.escape(self.prefix)}-(\d+)\.")
        gone = []
        for p in sorted(folder.glob(f".{self.prefix}-*.tmp")):
            if owns is not None:
                m = numbered.match(p.name)
                if not (m and owns(int(m.group(1)))):
                    continue
            p.unlink(missing_ok=True)
            gone.append(p.name)
        return gone


PACK = ShardFiles(prefix="shard", payload=".tar", format="kpnb-shards/1", delay_env="KPNB_PACK_DELAY_S")
FILTER = ShardFiles(prefix="filter", payload=".jsonl", format="kpnb-filter/1", delay_env="KPNB_FILTER_DELAY_S")


def read_format_json(path: str | Path, fmt: str, missing: str) -> dict[str, Any]:
    """A JSON file this package wrote, checked for its ``format`` tag; a clear DataError naming the file when it
    is missing (``missing`` says what to run first), not JSON, or of another format."""
    path = Path(path)
    try:
        m = json.loads(path.read_text())
    except OSError as e:
        raise DataError(f"{path}: {missing} ({e.__class__.__name__})") from e
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != fmt:
        raise DataError(f"{path}: format {m.get('format') if isinstance(m, dict) else None!r}, expected {fmt!r}")
    return m
