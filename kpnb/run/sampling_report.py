"""Notebook 05's run: the diffusion models of a run folder and the data they are scored on, the real-pose set
as it is sampled, the tables the notebook prints, the pose editor, and the metrics it writes; and notebook 05b's
released checkpoint: what to download when it is missing, and its metrics."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from torch import nn

from kpnb.data import subset as data
from kpnb.data.real_poses import real_pose_set
from kpnb.diffusion.ldm import KeypointLDM
from kpnb.diffusion.sampling import sample_images
from kpnb.evaluate import vq as vq_eval
from kpnb.evaluate.generators import RealPoseRun
from kpnb.evaluate.pose import pck_by_view
from kpnb.evaluate.quality import ImageDistance
from kpnb.models.pose_net import predict
from kpnb.original.common import DOWNLOADS
from kpnb.poses import analysis as pose_analysis
from kpnb.poses.pose import MISSING, OUTSIDE, VIEWS, VISIBLE, Pose
from kpnb.run.folder import FURTHER, RunFiles
from kpnb.run.tables import score_table
from kpnb.train import estimator as estimator_training
from kpnb.train import ldm as ldm_training
from kpnb.train import vq

HELDOUT_COLUMNS = ["pck@0.05", "pck@0.1", "pck@0.2", "pck@0.1.arms", "pck@0.1.legs", "pck@0.1.ratio", "ap", "ap@0.5",
                   "ap.ratio"]
REAL_COLUMNS = ["pck@0.05", "pck@0.1", "pck@0.2", "pck@0.1.head", "pck@0.1.arms", "pck@0.1.legs", "ap", "ap@0.5"]
# the conditionings of the real poses: completed (every unlabelled joint placed, as the models were trained) and as
# annotated; both scored against the annotation
CONDITIONINGS = ("completed", "as annotated")


@dataclass
class RunModels:
    """A run's diffusion models of one spec and what they are scored with."""

    models: dict[str, KeypointLDM]          # conditioning mode -> model, and FURTHER: the best mode trained further
    vq: nn.Module                           # the spec's autoencoder, which decodes them
    generators: dict[str, tuple[KeypointLDM, nn.Module]]  # every model scored, with its VQ: models and extra specs
    further_of: str | None                  # the mode trained further (notebook 04's best), None before notebook 04
    estimator: nn.Module                    # notebook 04's pose estimator
    ceiling: dict[str, float]               # its PCK and AP on exact renders
    train: dict[str, Any]                   # the run's subsets
    val: dict[str, Any]


def load_run_models(files: RunFiles, spec: str, modes: Sequence[str], extra_specs: Sequence[str]) -> RunModels | None:
    """The run's diffusion models of ``spec`` for ``modes``, the best mode trained further (as :data:`FURTHER`) and
    the best mode on each of ``extra_specs``' latents where they were trained, with the pose estimator, its ceiling
    and the subsets. None when the run has no model of ``spec`` for any of ``modes``."""
    if not any(files.has(files.ldm(spec, m)) for m in modes):
        return None
    val, train = data.load_subset(files.root, "val"), data.load_subset(files.root, "train")
    ae = vq.load_vq(files.vq(spec))
    estimator = estimator_training.load_estimator(files.estimator())
    models = {m: ldm_training.load_ldm(files.ldm(spec, m)) for m in modes}
    best = files.best_mode()
    if best in modes and files.has(files.ldm(spec, best, further=True)):
        models[FURTHER] = ldm_training.load_ldm(files.ldm(spec, best, further=True))
    generators = {name: (m, ae) for name, m in models.items()}
    for s in extra_specs:
        if best and files.has(files.ldm(s, best)):
            generators[s] = (ldm_training.load_ldm(files.ldm(s, best)), vq.load_vq(files.vq(s)))
    return RunModels(models, ae, generators, best if FURTHER in models else None, estimator,
                     files.estimator_ceiling(), train, val)


def best_label(best: str, run: RunModels) -> str:
    """The best mode's name for the samples file notebooks 06 and 08 read."""
    return best if best != FURTHER else f"{run.further_of} (trained further)"


# ---- the real poses ------------------------------------------------------------------------------------------
@dataclass
class RealPoses:
    """The real-pose set as sampled: the annotation (every score is against it) and its completed poses."""

    labels: list[str]
    poses: list[Pose]
    annotated: np.ndarray     # [N, 17, 3] as COCO labels them
    completed: np.ndarray     # every unlabelled joint placed as the nearest training pose has it

    def conditionings(self) -> dict[str, np.ndarray]:
        return dict(zip(CONDITIONINGS, (self.completed, self.annotated)))

    def summary(self) -> str:
        a, c = self.annotated[..., 2], self.completed[..., 2]
        return (f"{len(self.poses)} real poses, {int((a == MISSING).sum())} unlabelled joints completed "
                f"({int((c == OUTSIDE).sum() - (a == OUTSIDE).sum())} of them outside the frame); "
                f"{int((a == VISIBLE).sum())} visible joints scored")


def real_poses_for(path: str | Path, train_poses: np.ndarray) -> RealPoses:
    """The real-pose set at ``path`` (:func:`kpnb.data.real_poses.real_pose_set`), completed against the training
    poses (:func:`kpnb.poses.analysis.complete_poses`)."""
    labels, poses = real_pose_set(path)
    annotated = np.stack([p.to_array() for p in poses])
    return RealPoses(labels, poses, annotated, pose_analysis.complete_poses(annotated, train_poses))


def heldout_by_view(estimator: nn.Module, images: np.ndarray, poses: np.ndarray) -> dict[str, float]:
    """PCK@0.1 of samples for held-out ``poses`` per view of the figure (:func:`kpnb.poses.analysis.pose_views`)."""
    return pck_by_view(predict(estimator, images), poses, pose_analysis.pose_views(poses))


def real_pose_report(best: str, heldout: Mapping[str, float], runs: Mapping[str, RealPoseRun],
                     heldout_views: Mapping[str, float], seeds: Sequence[int]) -> str:
    """The real poses' table beside the held-out poses', PCK@0.1 by view, and each conditioning's PCK@0.1 with
    its spread over ``seeds``, its ratio to the held-out one (the target: at least 0.8) and to the ceiling."""
    rows = {f"{best} on held-out poses": heldout}
    for name, r in runs.items():
        rows.update({f"ceiling on renders, {name}": r.ceiling, f"{best} on the real poses, {name}": r.scores})
    real_views = runs["completed"].by_view

    def at(scores: Mapping[str, float], v: str) -> str:
        return f"{scores.get(f'{v}.pck@0.1', float('nan')):.3f} ({scores.get(f'{v}.n', 0)})"

    views = [v for v in VIEWS if f"{v}.n" in heldout_views or f"{v}.n" in real_views]
    lines = [score_table(rows, REAL_COLUMNS, name_width=40), "PCK@0.1 by view (poses): " + "; ".join(
        f"{v} held-out {at(heldout_views, v)}, real {at(real_views, v)}" for v in views)]
    held = heldout["pck@0.1"]
    for name, r in runs.items():
        ratio = f"{r.scores['pck@0.1'] / held:.2f}" if held > 0 else "-"
        lines.append(f"{name}: PCK@0.1 {r.scores['pck@0.1']:.3f} +- {r.scores['pck@0.1_spread']:.3f} (seeds "
                     f"{list(seeds)}); real / held-out = {ratio} (target >= 0.8); of the ceiling on the real poses: "
                     f"{r.scores.get('pck@0.1.ratio', float('nan')):.2f}")
    return "\n".join(lines)


# ---- image quality -------------------------------------------------------------------------------------------
@dataclass
class FidFloors:
    """What a perfect generator would score: notebook 03's FID of each spec's held-out reconstructions, and at the
    samples' n (FID grows at small n) as many training images and (f4 runs) their f4 reconstructions."""

    reconstructions: dict[str, float | None]
    real_same_n: dict[str, float]
    recon_same_n: dict[str, float] | None


def fid_floors(files: RunFiles, dist: ImageDistance, run: RunModels, spec: str, n: int) -> FidFloors:
    """The :class:`FidFloors` of a run at ``n`` samples."""
    recons = {s: files.metrics("03_vq_training").get(f"{s}.fid") for s in ("f4", "f8", "f16")}
    train_n = run.train["images"][:n]
    recon_n = dist.score(vq_eval.reconstruct(run.vq, train_n)[0]) if spec == "f4" else None
    return FidFloors(recons, dist.score(train_n), recon_n)


def fid_table(fid: Mapping[str, Mapping[str, float]], floors: FidFloors) -> str:
    """FID and KID (with their spread) per model, beside the floors and as a multiple of them."""
    same_n = floors.recon_same_n["fid"] if floors.recon_same_n else None
    f4 = floors.reconstructions.get("f4")
    lines = [f"{'':18}{'FID':>10}{'+-':>8}{'KID':>10}{'+-':>8}{'FID / f4 recon':>16}{'/ recon, same n':>16}"]
    lines += [f"{s + ' reconstr.':18}{v:>10.3f}" for s, v in floors.reconstructions.items() if v is not None]
    lines.append(f"{'real, same n':18}{floors.real_same_n['fid']:>10.3f}{'':>8}{floors.real_same_n['kid']:>10.4f}")
    if floors.recon_same_n:
        lines.append(f"{'f4 recon, same n':18}{same_n:>10.3f}{'':>8}{floors.recon_same_n['kid']:>10.4f}")
    for name, r in fid.items():
        lines.append(f"{name:18}{r['fid']:>10.3f}{r['fid_spread']:>8.3f}{r['kid']:>10.4f}{r['kid_spread']:>8.4f}"
                     f"{r['fid'] / f4 if f4 else float('nan'):>16.2f}"
                     f"{r['fid'] / same_n if same_n else float('nan'):>16.2f}")
    return "\n".join(lines)


# ---- the pose editor and the released model ------------------------------------------------------------------
def pose_editor(presets: Mapping[str, Pose], model: KeypointLDM, vq_model: nn.Module,
                sample_kw: Mapping[str, Any]) -> Any:
    """The pose editor (:class:`kpnb.run.widgets.PoseEditor`) with ``presets``, generating four samples (seed 0)
    of ``model`` for the edited pose."""
    from kpnb.run.widgets import PoseEditor

    return PoseEditor(presets, lambda pose: sample_images(model, vq_model, np.stack([pose.to_array()] * 4), seed=0,
                                                          **sample_kw))


def released_checkpoint_missing() -> str:
    """What to download and where to put it, for a run without ``original_checkpoint``."""
    desc, where = DOWNLOADS["ldm"]
    return (f"original_checkpoint is not set: the released model is not sampled. Download {desc} from the original "
            f"project's release, put it at {where} (relative to the repository root) and set original_checkpoint to "
            f"its path relative to notebooks/: kpnb run --out outputs/original --only 05b -p "
            f"original_checkpoint=../{where} (README, 'The original checkpoints and pretrained CLIP'). Nothing is "
            f"downloaded automatically.")


def released_metrics(checkpoint: str | Path, settings: Mapping[str, Any]) -> dict[str, Any]:
    """The released checkpoint's file and the DDIM settings it was sampled with."""
    return {"original.checkpoint": str(checkpoint), **{f"original.{k}": v for k, v in settings.items()}}


# ---- metrics -------------------------------------------------------------------------------------------------
def heldout_metrics(run: RunModels, best: str, scored: Mapping[str, Mapping[str, float]], n_eval: int
                    ) -> dict[str, Any]:
    """The held-out poses' numbers: the best mode, each model's scores as ``<model>.<key>``, the ceiling's."""
    out: dict[str, Any] = {"best_mode": best, "n_eval": int(n_eval)}
    if FURTHER in run.models:
        out[f"{FURTHER}.mode"] = run.further_of
    for name, scores in scored.items():
        out.update({f"{name}.{k}": v for k, v in scores.items()})
    out.update({f"pck_ceiling@{a}": run.ceiling.get(f"pck@{a}") for a in ("0.05", "0.1", "0.2")})
    out.update({f"{k}_ceiling": run.ceiling.get(k) for k in ("ap", "ap@0.5", "ap@0.75")})
    return out


def real_pose_metrics(real: RealPoses, runs: Mapping[str, RealPoseRun], heldout_pck: float,
                      heldout_views: Mapping[str, float], seeds: Sequence[int]) -> dict[str, Any]:
    """The real poses' numbers (``real_poses.*``: the completed poses' scores and ceiling, the as-annotated ones,
    the ratio to the held-out PCK@0.1, None where that is 0) and PCK@0.1 by view (``by_view.*``)."""
    done, raw = runs["completed"], runs["as annotated"]
    ratio = done.scores["pck@0.1"] / heldout_pck if heldout_pck > 0 else None
    out: dict[str, Any] = {"real_poses.n": len(real.poses), "real_poses.ratio_to_heldout": ratio}
    if ratio is None:
        out["notes"] = "real_poses.ratio_to_heldout is null: the best mode's held-out PCK@0.1 is 0"
    out.update({f"real_poses.{k}": v for k, v in done.scores.items() if k not in ("n_images", "sample_images_per_s")})
    out.update({f"real_poses.ceiling.{k}": v for k, v in done.ceiling.items()
                if k in ("pck@0.05", "pck@0.2", "ap", "ap@0.5", "ap@0.75") or k.startswith("pck@0.1")})
    out.update({"real_poses.conditioning": "completed (kpnb.poses.analysis.complete_poses)",
                "real_poses.n_completed_joints": int((real.annotated[..., 2] == MISSING).sum()),
                "real_poses.seeds": list(seeds),
                "real_poses.as_annotated.pck@0.1": raw.scores["pck@0.1"],
                "real_poses.as_annotated.pck@0.1_spread": raw.scores["pck@0.1_spread"],
                "real_poses.as_annotated.ap": raw.scores.get("ap"),
                "real_poses.as_annotated.ceiling.pck@0.1": raw.ceiling["pck@0.1"],
                "real_poses.as_annotated.ratio_to_heldout": raw.scores["pck@0.1"] / heldout_pck if ratio is not None
                else None})
    out.update({f"by_view.heldout.{k}": v for k, v in heldout_views.items()})
    out.update({f"by_view.real_poses.{k}": v for k, v in done.by_view.items()})
    return out


def quality_metrics(fid: Mapping[str, Mapping[str, float]], dist: ImageDistance, n_fake: int, seeds: Sequence[int],
                    floors: FidFloors, diversity: Mapping[str, float], head_fid: Mapping[str, float]) -> dict[str, Any]:
    """FID and KID per model (``<model>.fid`` ...), how they were measured, the floors, diversity, head FID."""
    out: dict[str, Any] = {f"{name}.{k}": v for name, r in fid.items() for k, v in r.items()}
    out.update({"fid_features": dist.name, "fid_n_real": dist.n_real, "fid_n_fake": int(n_fake),
                "fid_seeds": list(seeds), "fid_floor.f4": floors.reconstructions.get("f4"),
                "fid_real_same_n": floors.real_same_n["fid"], "kid_real_same_n": floors.real_same_n["kid"],
                "fid_recon_same_n": floors.recon_same_n["fid"] if floors.recon_same_n else None})
    out.update({f"diversity.{k}": v for k, v in diversity.items()})
    out.update({f"{name}.head_fid": v for name, v in head_fid.items()})
    return out


def sweep_metrics(sweep: Mapping[Any, Mapping[str, float]]) -> dict[str, float]:
    """``guidance_sweep.<scale>.{pck@0.1,fid,kid}`` of :func:`kpnb.evaluate.generators.guidance_sweep`'s result."""
    return {f"guidance_sweep.{g}.{k}": r[k] for g, r in sweep.items() for k in ("pck@0.1", "fid", "kid")}
