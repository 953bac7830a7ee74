"""The run folder's names, the one place for them: which checkpoint folder each stage trains into, the
sample files one notebook writes for another, and the metric keys a later notebook reads from an earlier one.

Notebooks ask a :class:`RunFiles` (``nb.files`` on a :class:`kpnb.runs.NotebookRun`) for paths and values;
no notebook spells another notebook's file name or parses its keys. The folder's overall layout (config,
metrics, figures, checkpoints, samples) is described in :mod:`kpnb.runs`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import training

BEST_SAMPLES = "05_best_mode.npz"  # notebook 05's samples of its best mode, tuned by 06 and drawn by 08
TUNED_SAMPLES = "06_tuned.npz"     # notebook 06's tuned images, drawn by 08
N_TUNED_KEPT = 8                   # images kept per spec and prompt in TUNED_SAMPLES (for figures)
FURTHER = "long"                   # the name of the best diffusion mode trained on past the equal budget


@dataclass(frozen=True)
class RunFiles:
    """Paths and cross-notebook values of one run folder."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def dataset(self) -> Path:
        """Where notebook 01 writes the synthetic candidate pool (release layout: images/, keypoints/)."""
        return self.root / "dataset"

    # ---- checkpoint folders (created on first use) ----------------------------------------------------
    def checkpoints(self, stage: str) -> Path:
        p = self.root / "checkpoints" / stage
        p.mkdir(parents=True, exist_ok=True)
        return p

    def vq(self, spec: str) -> Path:
        return self.checkpoints(f"vq-{spec}")

    def estimator(self) -> Path:
        return self.checkpoints("estimator")

    def keeper(self) -> Path:
        return self.checkpoints("estimator-keeper")

    def clip(self) -> Path:
        return self.checkpoints("clip")

    def attributes(self) -> Path:
        return self.checkpoints("attributes")

    def transformer(self, spec: str) -> Path:
        return self.checkpoints(f"transformer-{spec}")

    def ldm(self, spec: str, mode: str, further: bool = False, subset: str = "") -> Path:
        """A diffusion model's folder: ``ldm-<spec>-<mode>``, or with ``further`` the best mode trained on
        past the equal budget (``ldm-<spec>-<mode>-long``), or with ``subset`` one trained on a part of the
        training subset (``ldm-<spec>-<mode>-strict``)."""
        return self.checkpoints(f"ldm-{spec}-{mode}" + (f"-{FURTHER}" if further else "")
                                + (f"-{subset}" if subset else ""))

    def latents(self, spec: str, split: str) -> Path:
        """The memory-mapped latent cache of a subset under a VQ spec (:func:`kpnb.stages.ldm_latents`)."""
        p = self.root / "latents" / f"{spec}-{split}.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def has(self, folder: Path) -> bool:
        """Whether a checkpoint folder holds a complete checkpoint."""
        return training.latest_checkpoint(folder) is not None

    # ---- metrics another notebook reads ---------------------------------------------------------------
    def metrics(self, stem: str, required: bool = True) -> dict[str, Any]:
        """A notebook's metrics file; {} when it has not run and ``required`` is False."""
        path = self.root / "metrics" / f"{stem}.json"
        if not path.exists():
            if required:
                raise FileNotFoundError(f"{path}: no metrics yet - run notebook {stem} first")
            return {}
        return json.loads(path.read_text())

    def estimator_ceiling(self) -> dict[str, float]:
        """The pose estimator's PCK on exact renders (notebook 04): ``{"pck@0.1": ..., ...}``."""
        prefix = "estimator.ceiling."
        return {k[len(prefix):]: v for k, v in self.metrics("04_ldm_training").items() if k.startswith(prefix)}

    def best_mode(self) -> str | None:
        """The conditioning mode notebook 04 chose (and trained further), None before it ran."""
        return self.metrics("04_ldm_training", required=False).get("best_mode")

    def best_ldm(self, spec: str = "f4") -> tuple[Path, str] | None:
        """The best diffusion model of ``spec``: (folder, label). The further-trained one when it exists."""
        best = self.best_mode()
        if best is None:
            return None
        for further, label in ((True, f"{best}, trained further"), (False, best)):
            folder = self.ldm(spec, best, further)
            if self.has(folder):
                return folder, label
        return None

    # ---- sample files ---------------------------------------------------------------------------------
    def save_best_samples(self, images: np.ndarray, poses: np.ndarray, mode: str) -> Path:
        path = self.root / "samples" / BEST_SAMPLES
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, images=images, poses=poses, mode=mode)
        return path

    def load_best_samples(self, n: int | None = None) -> tuple[np.ndarray, np.ndarray, str]:
        """(images, poses, mode label) of notebook 05's best mode, the first ``n``."""
        path = self.root / "samples" / BEST_SAMPLES
        if not path.exists():
            raise FileNotFoundError(f"{path}: no samples yet - run notebook 05_sampling first")
        with np.load(path, allow_pickle=False) as z:
            return z["images"][:n], z["poses"][:n], str(z["mode"])

    def save_tuned(self, start: np.ndarray, poses: np.ndarray, tuned: Mapping[tuple[str, str], np.ndarray],
                   recon: Mapping[str, np.ndarray]) -> Path:
        """Notebook 06's tuned images: ``start``, ``poses``, ``<spec>.<prompt key>``, ``<spec>.recon``."""
        k = N_TUNED_KEPT
        path = self.root / "samples" / TUNED_SAMPLES
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, start=start[:k], poses=poses[:k], **{f"{s}.{key}": v[:k] for (s, key), v in tuned.items()},
                 **{f"{s}.recon": v[:k] for s, v in recon.items()})
        return path

    def load_tuned(self) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """(start images, ``{"<spec>.<prompt key>": tuned images}``), None before notebook 06 ran."""
        path = self.root / "samples" / TUNED_SAMPLES
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            tuned = {k: z[k] for k in z.files if k.count(".") == 1 and not k.endswith(".recon")}
            return z["start"], tuned
