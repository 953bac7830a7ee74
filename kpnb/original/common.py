"""What the original checkpoints' importers share: where the files go and the import report."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from kpnb.original.lightning import (
    CheckpointImportError,
    LightningCheckpoint,
    read_lightning_checkpoint,
)

SUGGESTED_DIR = Path("data/checkpoints")
DOWNLOADS = {
    "vq": ("the original project's VQGAN f4 (taming-transformers 'custom_vqgan' trained on Danbooru: its "
           "PyTorch Lightning checkpoint, e.g. checkpoints/last.ckpt of that run)",
           SUGGESTED_DIR / "original_vq_f4.ckpt"),
    "ldm": ("the original project's keypoint latent-diffusion model (CompVis latent-diffusion, config "
            "danbooru-keypoints-ldm-vq-4.yaml: its PyTorch Lightning checkpoint, which also holds the VQGAN "
            "as first_stage_model)",
            SUGGESTED_DIR / "original_ldm_keypoints.ckpt"),
}


def load_lightning_checkpoint(path: str | Path, *, what: str | None = None) -> LightningCheckpoint:
    """:func:`kpnb.original.lightning.read_lightning_checkpoint`, with a missing file's message saying what to
    download and where to put it when ``what`` is "vq" or "ldm"."""
    path = Path(path)
    if what in DOWNLOADS and not path.is_file():
        desc, where = DOWNLOADS[what]
        raise FileNotFoundError(
            f"{path}: no such file. Download {desc} from the original project's release and put it at {where} "
            f"(relative to the repository root), or pass the path where you saved it. Nothing is downloaded "
            f"automatically.")
    return read_lightning_checkpoint(path)


# ======================================================================================================
# Reports and the generic copy
# ======================================================================================================
@dataclass
class ImportReport:
    """The bookkeeping of one import: ``mapped`` {original key: kpnb key}, ``unused`` {original key: why it
    was left over}, ``missing`` kpnb tensors the file did not fill (kept at their initial values, with the
    reason), ``notes`` (checks made, choices taken), ``meta`` (epoch, global_step, ...). ``str()`` is a
    summary."""

    source: str
    mapped: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"import of {self.source}"]
        if self.meta:
            lines.append("  file: " + ", ".join(f"{k} {v}" for k, v in self.meta.items()))
        lines.append(f"  mapped: {len(self.mapped)} original keys -> {len(set(self.mapped.values()))} kpnb tensors")
        groups: dict[str, list[str]] = {}
        for k, why in self.unused.items():
            groups.setdefault(why, []).append(k)
        lines.append(f"  left over (unused): {len(self.unused)} keys" + (":" if groups else ""))
        for why, keys in groups.items():
            lines.append(f"    {len(keys)} x {why} (e.g. {keys[0]})")
        lines.append(f"  missing: {len(self.missing)}" + (":" if self.missing else ""))
        lines += [f"    {k}: {why}" for k, why in self.missing.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def copy_into(model: nn.Module, mapping: Mapping[str, list[str]], state: Mapping[str, torch.Tensor],
               report: ImportReport, prefix: str = "", kpnb_only: Mapping[str, str] | None = None,
               where: str = "") -> None:
    """Fill ``model`` from ``state``: each kpnb tensor k from ``prefix + src`` for src in ``mapping[k]``
    (several sources are concatenated along dim 0). Shapes must match exactly; tensors are cast to the
    model's dtype. kpnb tensors without a source go to ``report.missing`` (with the reason from
    ``kpnb_only`` where given) and keep their current values."""
    kpnb_only = kpnb_only or {}
    own = model.state_dict()
    new = {}
    for k, cur in own.items():
        srcs = mapping.get(k)
        if not srcs:
            report.missing[k] = kpnb_only.get(k, "no source key for it in the mapping")
            continue
        absent = [prefix + s for s in srcs if prefix + s not in state]
        if absent:
            report.missing[k] = f"the file has no {', '.join(absent)}"
            continue
        parts = [state[prefix + s] for s in srcs]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        if tuple(t.shape) != tuple(cur.shape):
            raise CheckpointImportError(
                f"{where}: {' + '.join(prefix + s for s in srcs)} has shape {tuple(t.shape)}, kpnb's {k} needs "
                f"{tuple(cur.shape)}: the checkpoint's architecture differs from the one inferred")
        new[k] = t.to(dtype=cur.dtype)
        for s in srcs:
            report.mapped[prefix + s] = k
    model.load_state_dict({**own, **new}, strict=True)


def check_missing(report: ImportReport, allowed: Iterable[str], where: str) -> None:
    bad = [f"{k} ({why})" for k, why in report.missing.items() if k not in set(allowed)]
    if bad:
        raise CheckpointImportError(f"{where}: {len(bad)} kpnb tensors not found in the file: {'; '.join(bad[:8])}")
