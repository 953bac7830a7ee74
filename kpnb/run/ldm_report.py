"""Notebook 04's comparisons of a run's diffusion models: choosing the best mode, the overfitting check of its
longer run, loose against strict filtering, the best mode on another VQ's latents, validation losses, and the
tables and metrics the notebook prints and writes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from kpnb.data import filtering
from kpnb.diffusion.ldm import KeypointLDM, encode_latents, model_stats
from kpnb.diffusion.sampling import sample_images
from kpnb.evaluate.pose import pck, pose_fidelity
from kpnb.models.pose_net import predict
from kpnb.run import stages
from kpnb.run.folder import FURTHER, RunFiles
from kpnb.train.ldm import validation_loss
from kpnb.train.vq import load_vq


@dataclass
class Scoring:
    """What notebook 04 scores its diffusion models with: the VQ decoding them, the pose estimator, the
    held-out subset with its latents (scaled by the models' scale factor) and the DDIM settings."""

    vq: nn.Module
    estimator: nn.Module
    val: Mapping[str, Any]       # the held-out subset: images, poses
    latents: torch.Tensor        # its latents [N, C, h, w], scaled
    sample_kw: Mapping[str, Any]


def validation_losses(model: KeypointLDM, s: Scoring) -> dict[str, float]:
    """The model's training loss on the held-out latents (the same noise and timesteps for every model), with
    the pose (``val_loss``) and with the learned null pose (``val_loss_uncond``): the gap is how much it uses it."""
    return {"val_loss": validation_loss(model, s.latents, s.val["poses"], seed=0),
            "val_loss_uncond": validation_loss(model, s.latents, s.val["poses"], seed=0, uncond=True)}


def selection_pck(models: Mapping[str, KeypointLDM], s: Scoring, n: int) -> dict[str, float]:
    """PCK@0.1 of each model's samples (seed 0) for the last ``n`` held-out poses: the best mode is chosen on
    these, apart from the first poses notebook 05 reports on."""
    poses = s.val["poses"][len(s.val["poses"]) - n:]
    return {name: pose_fidelity(m, s.vq, s.estimator, poses, seed=0, **s.sample_kw)[1]["pck@0.1"]
            for name, m in models.items()}


# ---- the overfitting check -------------------------------------------------------------------------------------
@dataclass
class OverfittingCheck:
    """Scores a model at a step of its longer run (``check(model, step)``, :func:`kpnb.run.stages.train_further`'s
    ``score``): ``epochs``, the loss on the held-out latents and on as many training latents (the same noise and
    timesteps), and the FID of samples for the first ``n_fid`` held-out poses."""

    s: Scoring
    dist: Any                    # the run's ImageDistance against the held-out images
    train_latents: torch.Tensor  # the first len(held-out) training latents, scaled
    train_poses: np.ndarray      # their poses
    n_fid: int
    n_train: int                 # training images
    batch_size: int

    def __call__(self, model: KeypointLDM, step: int) -> dict[str, float]:
        images = sample_images(model, self.s.vq, self.s.val["poses"][: self.n_fid], seed=0, **self.s.sample_kw)
        return {"epochs": step * self.batch_size / self.n_train,
                "val_loss": validation_loss(model, self.s.latents, self.s.val["poses"], seed=0),
                "train_loss": validation_loss(model, self.train_latents, self.train_poses, seed=0),
                "fid": self.dist.score(images)["fid"]}


def overfitting_check(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], s: Scoring, z_train: np.ndarray,
                      scale: float, train_poses: np.ndarray, n_fid: int = 64) -> OverfittingCheck:
    """The :class:`OverfittingCheck` of a run: ``z_train`` its training latent cache ([N, 2, C, h, w], unscaled;
    the unflipped ones are used), FID in the run's features (:func:`kpnb.run.stages.distance_for_run`) of at most
    ``n_fid`` samples."""
    z_fit = torch.from_numpy(np.array(z_train[: len(s.latents), 0])) * scale  # a copy: the cache is read-only
    return OverfittingCheck(s, stages.distance_for_run(root, cfg, s.val["images"]), z_fit,
                            train_poses[: len(z_fit)], min(n_fid, len(s.val["poses"])), len(train_poses),
                            cfg["diffusion"]["batch_size"])


def curve_table(curve: Sequence[Mapping[str, float]], n_fid: int) -> str:
    """The overfitting check's points, one line per step."""
    fid = f"FID (n={n_fid})"
    lines = [f"{'step':>6} {'epochs':>7} {'held-out loss':>14} {'training loss':>14} {fid:>12}"]
    lines += [f"{c['step']:>6} {c['epochs']:>7.1f} {c['val_loss']:>14.4f} {c['train_loss']:>14.4f} {c['fid']:>12.2f}"
              for c in curve]
    return "\n".join(lines)


# ---- loose against strict filtering ----------------------------------------------------------------------------
def strict_comparison(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], spec: str, mode: str,
                      loose: KeypointLDM, s: Scoring, train_poses: np.ndarray) -> dict[str, Any]:
    """``mode`` trained at the same budget on the strict part of the training subset (:data:`STRICT_RULE
    <kpnb.data.filtering.STRICT_RULE>`) beside ``loose`` (trained on all of it): PCK@0.1 and AP on notebook 05's
    held-out poses (the first ``diffusion.n_eval``), PCK@0.1 on the whole figures among them and on the rest
    (None where there are none), and the held-out loss."""
    rows = stages.subset_rows(train_poses, "strict")
    strict, r = stages.train_ldm(root, cfg, spec, mode, subset="strict")
    held = s.val["poses"][: cfg["diffusion"]["n_eval"]]
    whole = filtering.strict_keep(held)
    out: dict[str, Any] = {"mode": mode, "rule": filtering.STRICT_RULE, "n_train.loose": len(train_poses),
                           "n_train.strict": len(rows), "steps": r.step, "train_seconds": r.seconds,
                           "n_eval": len(held), "n_eval.whole": int(whole.sum())}
    for name, m in (("loose", loose), ("strict", strict)):
        images, sc = pose_fidelity(m, s.vq, s.estimator, held, seed=0, **s.sample_kw)
        found = predict(s.estimator, images)
        out[f"{name}.pck@0.1"], out[f"{name}.ap"] = sc["pck@0.1"], sc["ap"]
        for part, mask in (("whole", whole), ("partial", ~whole)):
            out[f"{name}.pck@0.1.{part}"] = pck(found[mask], held[mask])["pck@0.1"] if mask.any() else None
        out[f"{name}.val_loss"] = validation_loss(m, s.latents, s.val["poses"], seed=0)
    return out


def strict_table(cmp: Mapping[str, Any]) -> str:
    """:func:`strict_comparison`'s numbers, one line per training set."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"{'trained on':10} {'images':>7} {'PCK@0.1':>8} {'whole':>7} {'partial':>8} {'AP':>6} {'val loss':>9}"]
    for name in ("loose", "strict"):
        lines.append(f"{name:10} {cmp['n_train.' + name]:>7} {fmt(cmp[name + '.pck@0.1']):>8} "
                     f"{fmt(cmp[name + '.pck@0.1.whole']):>7} {fmt(cmp[name + '.pck@0.1.partial']):>8} "
                     f"{fmt(cmp[name + '.ap']):>6} {cmp[name + '.val_loss']:>9.4f}")
    return "\n".join(lines)


# ---- other latents ---------------------------------------------------------------------------------------------
def train_on_spec(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], spec: str, mode: str,
                  val: Mapping[str, Any]) -> dict[str, Any]:
    """``mode`` trained at the equal budget on ``spec``'s latents: its latent shape, training speed and time, and
    its held-out loss."""
    m, r = stages.train_ldm(root, cfg, spec, mode)
    z_val = encode_latents(load_vq(RunFiles(Path(root)).vq(spec)), val["images"])
    return {"mode": mode, "latent_shape": "x".join(map(str, m.latent_shape)), "train_images_per_s": r.images_per_s,
            "train_seconds": r.seconds, "train_steps": r.step,
            "val_loss": validation_loss(m, z_val * m.scale_factor, val["poses"], seed=0)}


# ---- metrics ---------------------------------------------------------------------------------------------------
def unet_stats(model: KeypointLDM, latent_hw: Sequence[int], pose: np.ndarray) -> dict[str, float]:
    """The UNet's parameters (millions) and forward GFLOP per image at ``latent_hw``, conditioned on ``pose``
    [1, 17, 3]: ``unet_params_M``, ``unet_forward_gflop_per_image``."""
    unet = model.unet
    stats = model_stats(unet, [torch.zeros(1, unet.cfg.in_channels, *latent_hw), torch.zeros(1, dtype=torch.long),
                               model.cond(torch.as_tensor(pose)).context])
    return {"unet_params_M": stats["params_M"], "unet_forward_gflop_per_image": stats["gflop_per_sample"]}


def model_metrics(results: Mapping[str, Any], val_losses: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Per model (``<name>.<key>``): training speed, seconds, steps, the mean of its last ten losses, and its
    validation losses."""
    out: dict[str, Any] = {}
    for name, losses in val_losses.items():
        r = results[name]
        hist = [h["loss"] for h in r.history if "loss" in h]
        out.update({f"{name}.train_images_per_s": r.images_per_s, f"{name}.train_seconds": r.seconds,
                    f"{name}.train_steps": r.step, f"{name}.final_loss": float(np.mean(hist[-10:])) if hist else None})
        out.update({f"{name}.{k}": v for k, v in losses.items()})
    return out


def total_train_seconds(results: Mapping[str, Any], modes: Sequence[str], best: str,
                        extra: Mapping[str, Mapping[str, Any]], strict: Mapping[str, Any]) -> float:
    """Every diffusion model's training seconds: the modes, what the longer run added (it was forked from the
    best mode's equal-budget run, whose seconds it includes), the other specs and the strict model."""
    further = results[FURTHER].seconds - results[best].seconds if FURTHER in results else 0.0
    return float(sum(results[m].seconds for m in modes) + further + sum(e["train_seconds"] for e in extra.values())
                 + strict.get("train_seconds", 0.0))


def curve_metrics(curve: Sequence[Mapping[str, float]], check: OverfittingCheck | None) -> dict[str, Any]:
    """The overfitting check as lists by step (``curve.<key>``), {} when the best mode was not trained further."""
    if not curve or check is None:
        return {}
    out: dict[str, Any] = {"curve.n_fid": check.n_fid, "curve.n_train": check.n_train}
    out.update({f"curve.{k}": [c[k] for c in curve] for k in ("step", "epochs", "val_loss", "train_loss", "fid")})
    return out
