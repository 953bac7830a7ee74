"""The run folder, the one layout every notebook and command shares::

    config.json          preset name + overrides + resolved settings
    notebooks/           the executed notebooks (papermill)
    metrics/<stem>.json  what each notebook measured (flat keys, + preset, seconds, torch_threads)
    figures/             PNG figures
    checkpoints/<stage>/ safetensors + JSON config per stage
    samples/             generated images
    dataset/             the synthetic dataset (unless ``dataset_dir`` points at real data)

:func:`run_dir` makes (or opens) one; :class:`NotebookRun` is what every notebook does first (resolve its
preset and folder, time itself, write its metrics); :class:`RunFiles` holds the names: which checkpoint folder
each stage trains into, the sample files one notebook writes for another, and the metric keys a later notebook
reads from an earlier one, so no notebook spells another notebook's file name or parses its keys.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

from kpnb.core.files import atomic_path, repo_root, write_json, write_metrics
from kpnb.core.lock import hold_until_exit
from kpnb.core.settings import SETTINGS_LOG_ENV, ConfigError, _ReadLog, preset_config
from kpnb.train import checkpoints

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
        """The memory-mapped latent cache of a subset under a VQ spec (:func:`kpnb.run.stages.ldm_latents`)."""
        p = self.root / "latents" / f"{spec}-{split}.npy"
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def has(self, folder: Path) -> bool:
        """Whether a checkpoint folder holds a complete checkpoint."""
        return checkpoints.latest_checkpoint(folder) is not None

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
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, images=images, poses=poses, mode=mode)
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
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, start=start[:k], poses=poses[:k], **{f"{s}.{key}": v[:k] for (s, key), v in tuned.items()},
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


if TYPE_CHECKING:  # runtime imports torch: NotebookRun imports it when a notebook starts
    from kpnb.core.runtime import Runtime


# ---- run folders --------------------------------------------------------------------------------------
SUBDIRS = ("notebooks", "metrics", "figures", "checkpoints", "samples")


def default_run_dir(preset: str) -> Path:
    return repo_root() / "outputs" / f"{time.strftime('%Y%m%d-%H%M%S')}_{preset}"


def run_dir(path: str | Path, preset: str | None = None, overrides: Mapping[str, Any] | None = None) -> Path:
    """Create (or open) a run folder. The first call writes ``config.json``; a later call with a different
    preset is refused, so two presets never mix in one run. Bad ``overrides`` (:func:`preset_config`) are
    refused before the folder is made."""
    root = Path(path)
    settings = preset_config(preset, overrides) if preset is not None else None
    for sub in SUBDIRS:
        (root / sub).mkdir(parents=True, exist_ok=True)
    cfg_path = root / "config.json"
    if cfg_path.exists():
        existing = json.loads(cfg_path.read_text())
        if preset is not None and existing.get("preset") != preset:
            raise ConfigError(f"{cfg_path}: run was made with preset {existing.get('preset')!r}, not {preset!r}")
    elif preset is not None:
        write_json(cfg_path, {"preset": preset, "overrides": dict(overrides or {}), "settings": settings})
    return root


# ---- the notebook side ---------------------------------------------------------------------------------
class NotebookRun:
    """What every notebook does first: resolve its preset and run folder, time itself, write its metrics.

    ``run_dir=""`` (a person clicking through JupyterLab) means ``outputs/notebooks_<preset>/``, the same
    folder for every notebook, so 02 finds what 01 wrote; ``kpnb run`` passes its own folder. ``overrides`` are
    :func:`kpnb.core.settings.preset_config`'s (dotted keys at any depth, dict values merged), checked before
    anything is made: an unknown key or a value of the wrong type raises ConfigError naming it.

    The run folder has one writer (:mod:`kpnb.core.lock`): under ``kpnb run`` the notebook works under that
    command's lock; opened by hand, it takes the folder's lock and keeps it until :meth:`finish` (or until its
    kernel exits, when the notebook stops before its end), so a second kernel (or a ``kpnb run``/``kpnb train``)
    on the same folder raises FolderLocked naming this one while it works, and the next notebook opens once
    this one has finished.
    """

    def __init__(self, stem: str, preset: str, run_dir_: str = "", overrides: Mapping[str, Any] | None = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.stem = stem
        self.preset = preset
        self.cfg = preset_config(preset, overrides)
        self._read_log = os.environ.get(SETTINGS_LOG_ENV)
        if self._read_log:
            self.cfg = {name: _ReadLog(name, section) for name, section in self.cfg.items()}
        root = Path(run_dir_ or repo_root() / "outputs" / f"notebooks_{preset}")
        self._lock = hold_until_exit(root, f"notebook {stem}")  # FolderLocked, naming the holder, before any write
        self.root = run_dir(root, preset, overrides)
        from kpnb.core import runtime

        self._runtime = runtime.use(runtime.Runtime.from_settings(self.cfg["runtime"]))
        print(f"runtime: {self._runtime.describe()}")
        self.t0 = time.time()

    def path(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def figure(self, name: str) -> Path:
        return self.path("figures", f"{self.stem}_{name}.png")

    @property
    def files(self) -> "RunFiles":
        """The run folder's names (checkpoint folders, sample files, cross-notebook metrics)."""
        return RunFiles(self.root)

    @property
    def runtime(self) -> "Runtime":
        """Device, precision and ranks of this notebook's models (the preset's ``runtime`` section); made the
        process's current runtime (:func:`kpnb.core.runtime.use`) when the notebook starts."""
        return self._runtime

    @property
    def seconds(self) -> float:
        return time.time() - self.t0

    def finish(self, metrics: Mapping[str, Any]) -> Path:
        path = write_metrics(self.root, self.stem, metrics, preset=self.preset, seconds=self.seconds)
        print(f"metrics written to {path}")
        if self._read_log:
            read = sorted(set().union(*(section.read for section in self.cfg.values())))
            with open(self._read_log, "a") as f:
                f.write(json.dumps({"notebook": self.stem, "read": read}) + "\n")
        if self._lock is not None:
            self._lock.release()  # its work is written: the next notebook may open the folder
        return path
