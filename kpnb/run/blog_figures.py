"""What notebook 08 redraws the write-up's figures from: the generators a run folder holds, their samples, and
the candidate pool's keypoint files."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kpnb.diffusion.sampling import sample_images, sample_kwargs
from kpnb.models import transformer
from kpnb.poses.formats import read_release_json
from kpnb.poses.pose import PoseError
from kpnb.run.folder import RunFiles
from kpnb.train.ldm import load_ldm
from kpnb.train.transformer import load_transformer
from kpnb.train.vq import load_vq


@dataclass(frozen=True)
class System:
    """A trained generator of a run: ``kind`` "ldm" or "transformer", its checkpoint folder and VQ spec."""

    kind: str
    folder: Path
    spec: str


def systems_of_run(files: RunFiles, transformer_spec: str) -> dict[str, System]:
    """The run's generators by display name: the best diffusion model of f4 and of f8 (trained further when it
    was, :meth:`RunFiles.best_ldm`), and the transformer of ``transformer_spec``; each only when trained."""
    systems = {}
    for spec in ("f4", "f8"):
        if (found := files.best_ldm(spec)) is not None:
            systems[f"diffusion {spec} ({found[1]})"] = System("ldm", found[0], spec)
    if files.has(files.transformer(transformer_spec)):
        systems[f"transformer {transformer_spec}"] = System("transformer", files.transformer(transformer_spec),
                                                            transformer_spec)
    return systems


def sample_system(system: System, files: RunFiles, poses: np.ndarray, cfg: Mapping[str, Mapping[str, Any]]
                  ) -> np.ndarray:
    """One sample per pose (seed 0) of ``system``, with the preset's sampling settings (``cfg``: the run's
    settings; DDIM from ``diffusion``, temperature, top-k and top-p from ``transformer``)."""
    ae = load_vq(files.vq(system.spec))
    if system.kind == "ldm":
        return sample_images(load_ldm(system.folder), ae, poses, seed=0, **sample_kwargs(cfg["diffusion"]))
    t = cfg["transformer"]
    return transformer.sample_images(load_transformer(system.folder), ae, poses, seed=0, temperature=t["temperature"],
                                     top_k=t["top_k"], top_p=t["top_p"])


def keypoint_folder_poses(folder: str | Path) -> np.ndarray:
    """Every release-JSON keypoint file of ``folder`` (sorted by name) as poses [N, 17, 3]; files that are not a
    valid pose are left out (notebook 01 counted and listed them)."""
    poses = []
    for p in sorted(Path(folder).glob("*.json")):
        try:
            poses.append(read_release_json(p).to_array())
        except PoseError:
            pass
    return np.stack(poses) if poses else np.zeros((0, 17, 3), np.float32)
