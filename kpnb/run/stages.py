"""The training stages of a run, callable from a notebook and from ``kpnb train`` alike.

``kpnb train STAGE --run-dir DIR`` trains one stage of a run folder outside the notebooks, e.g. on several GPUs::

    torchrun --nproc_per_node 4 -m kpnb train ldm --run-dir outputs/big --mode skeleton

(``--run-dir``, not ``--run``: torchrun's own parser takes ``--run`` for its ``--run-path``.)

Every stage writes the checkpoint folder its notebook uses (:class:`kpnb.run.folder.RunFiles`) with the same
config, so the notebook finds the finished checkpoint, resumes it at its last step and trains nothing
(notebooks 03, 04, 06 and 07 train only what is missing). A stage trained with N ranks resumes with M: the
checkpoint holds one unwrapped model, and the data order is a function of (seed, step) alone.

Stages: ``vq`` (one spec, or every one of ``vq.specs``), ``estimator``, ``ldm`` (one mode and spec;
``--further`` the best mode's longer run), ``transformer``, ``clip`` (the domain CLIP).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from kpnb import synth
from kpnb.core.files import atomic_write_bytes
from kpnb.core.runtime import Runtime, current
from kpnb.data import filtering
from kpnb.data import folder as kdata
from kpnb.data import subset as data
from kpnb.diffusion import ldm
from kpnb.poses import analysis as pose_analysis
from kpnb.poses import pose as keypoints
from kpnb.run.folder import RunFiles
from kpnb.train import checkpoints, transformer, vq
from kpnb.train import estimator as estimator_training
from kpnb.train import ldm as ldm_training

if TYPE_CHECKING:
    import torch

    from kpnb.evaluate.quality import ImageDistance

STAGES = ("vq", "estimator", "ldm", "transformer", "clip")


def _images_digest(images: np.ndarray) -> str:
    """A cheap fingerprint of an image array: its shape and every 97th image's bytes."""
    h = hashlib.sha1(repr(images.shape).encode())
    h.update(np.ascontiguousarray(images[::97]).tobytes())
    return h.hexdigest()[:16]


def ldm_latents(root: str | Path, spec: str, split: str = "train", *, images: np.ndarray | None = None,
                progress: bool = True, runtime: Runtime | None = None) -> np.ndarray:
    """The memory-mapped latent cache (:func:`kpnb.diffusion.ldm.latent_cache`, both flips) of a run's ``split``
    subset under its ``spec`` autoencoder, built on first use. Keyed on the VQ checkpoint and the images, so a
    retrained VQ or a new subset builds a new one."""
    rt = runtime or current()
    files = RunFiles(Path(root))
    images = data.load_subset(root, split)["images"] if images is None else images
    last = checkpoints.latest_checkpoint(files.vq(spec), verify=True)  # the one load_vq reads
    if last is None:
        raise checkpoints.CheckpointError(f"{files.vq(spec)}: no {spec} autoencoder yet - run notebook 03 "
                                       f"(or kpnb train vq --spec {spec}) first")
    identity = {"vq": last.name, "vq_json_sha1": hashlib.sha1(last.read_bytes()).hexdigest()[:16],
                "images": _images_digest(images)}
    ae = vq.load_vq(files.vq(spec)).to(rt.device)
    return ldm.latent_cache(ae, images, files.latents(spec, split), identity=identity, progress=progress,
                                  runtime=rt)


SUBSETS = ("strict",)  # parts of the training subset a diffusion model can be trained on (train_ldm)


def subset_rows(poses: np.ndarray, subset: str) -> np.ndarray:
    """Rows of the training subset in ``subset``: "strict" = :func:`kpnb.data.filtering.strict_keep`."""
    if subset not in SUBSETS:
        raise ValueError(f"unknown training subset {subset!r}; valid: {', '.join(SUBSETS)}")
    return np.flatnonzero(filtering.strict_keep(poses))


def training_rows(poses: np.ndarray, d: Mapping[str, Any], subset: str = "") -> np.ndarray:
    """The rows of the training subset a diffusion model draws its batches from: ``subset``'s rows
    (:func:`subset_rows`; all when ""), each repeated ``d["view_repeat"][view]`` times, ``view`` read from its
    pose by :func:`kpnb.poses.analysis.pose_views` (a view not named: once). A repeated row comes up that many
    times per pass over the rows, so its figure is seen that much more often; the checkpoint's ``n_train``
    counts the rows with their repeats (notebook 04's "epochs" are steps x batch over the images)."""
    rows = subset_rows(poses, subset) if subset else np.arange(len(poses))
    repeat = dict(d.get("view_repeat") or {})
    bad = {v: n for v, n in repeat.items()   # a bool is an int: True is no repeat count
           if v not in keypoints.VIEWS or isinstance(n, bool) or not isinstance(n, int) or n < 1}
    if bad:
        raise ValueError(f"diffusion.view_repeat: {bad} - each key one of {', '.join(keypoints.VIEWS)}, each value "
                         f"a whole number >= 1")
    if not repeat:
        return rows
    views = pose_analysis.pose_views(np.asarray(poses)[rows])
    return np.repeat(rows, [repeat.get(v, 1) for v in views])


def train_ldm(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], spec: str, mode: str, *,
              further: bool = False, subset: str = "", progress: bool = True, runtime: Runtime | None = None):
    """One diffusion model of a run: ``mode`` on ``spec``'s latents into ``RunFiles.ldm(spec, mode)``, with the
    preset's ``diffusion`` settings; ``further``: the best mode's longer run (forked from the equal-budget
    checkpoint, ``best_steps`` steps); ``subset``: trained on that part of the training subset only
    (:func:`subset_rows`; the same steps and the whole subset's latent scale); its rows repeated by view as
    :func:`training_rows` says. Returns (EMA model, TrainResult)."""
    files = RunFiles(Path(root))
    d = cfg["diffusion"]
    train = data.load_subset(root, "train")
    z = ldm_latents(root, spec, "train", images=train["images"], progress=progress, runtime=runtime)
    scale = ldm.scale_factor_of(z[:, 0])
    rows = training_rows(train["poses"], d, subset)
    out = files.ldm(spec, mode, further=further, subset=subset)
    if further:
        checkpoints.fork_checkpoint(files.ldm(spec, mode, subset=subset), out)
        d = {**d, "steps": d["best_steps"]}
    latent_set = ldm_training.LatentSet(z, train["poses"], rows=rows, scale_factor=scale)
    return ldm_training.train_ldm(latent_set, d, out, mode, progress=progress, runtime=runtime)


def curve_stops(d: Mapping[str, Any]) -> list[int]:
    """Where the best mode's longer run stops to be scored: ``curve_points`` equal stretches from ``steps`` to
    ``best_steps`` of a ``diffusion`` section (none when it is not trained further)."""
    lo, hi, n = int(d["steps"]), int(d["best_steps"]), max(1, int(d["curve_points"]))
    return sorted({lo + round((hi - lo) * k / n) for k in range(1, n + 1)} - {lo}) if hi > lo else []


def train_further(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], spec: str, mode: str, *,
                  score: Callable[[Any, int], Mapping[str, float]] | None = None, progress: bool = True,
                  runtime: Runtime | None = None) -> tuple[Any, Any, list[dict[str, float]]]:
    """The best mode trained on past the equal budget (:func:`train_ldm` with ``further``), in the stretches of
    :func:`curve_stops`: the same run as one stretch (a constant learning rate after warm-up, every random draw
    a function of the step), scored after each by ``score(model, step) -> dict``. The points are kept in the
    folder's ``curve.json`` as they come, so a rerun reads them back instead of retraining. Returns (EMA model,
    TrainResult, points by step)."""
    d = cfg["diffusion"]
    out = RunFiles(Path(root)).ldm(spec, mode, further=True)
    path = out / "curve.json"
    points = {int(p["step"]): p for p in json.loads(path.read_text())} if path.exists() else {}
    model = res = None
    for stop in curve_stops(d):
        last = checkpoints.latest_checkpoint(out)
        if last is not None and checkpoints.read_checkpoint_info(last)["step"] > stop and stop != d["best_steps"]:
            continue  # trained past this stop before: its point is in curve.json (or was never scored)
        model, res = train_ldm(root, {**cfg, "diffusion": {**d, "best_steps": stop}}, spec, mode, further=True,
                               progress=progress, runtime=runtime)
        if score is not None and stop not in points:
            points[stop] = {"step": stop, **{k: float(v) for k, v in score(model, stop).items()}}
            atomic_write_bytes(path, json.dumps([points[s] for s in sorted(points)], indent=1).encode())
    return model, res, [points[s] for s in sorted(points)]


def train_vq(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], spec: str, *, progress: bool = True,
             runtime: Runtime | None = None):
    """The ``spec`` autoencoder of a run on its training subset. Returns (model, info)."""
    return vq.train_vq(spec, data.load_subset(root, "train")["images"], cfg["vq"], RunFiles(Path(root)).vq(spec),
                       progress=progress, runtime=runtime)


def train_estimator(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], *, progress: bool = True,
                    runtime: Runtime | None = None):
    """The run's pose estimator (the PCK ruler) on ground-truth renders, drawn at the dataset's
    ``data.render_size`` as the dataset's images are. Returns (model, info)."""
    return estimator_training.fit_estimator(cfg["estimator"], RunFiles(Path(root)).estimator(),
                                        render_size=int(cfg["data"]["render_size"]), progress=progress,
                                        runtime=runtime)


def train_transformer(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], spec: str | None = None, *,
                      progress: bool = True, runtime: Runtime | None = None):
    """The conditional transformer over the run's ``spec`` codes (``transformer.spec`` by default)."""
    t = cfg["transformer"]
    spec = spec or t["spec"]
    train = data.load_subset(root, "train")
    ae = vq.load_vq(RunFiles(Path(root)).vq(spec))
    codes, poses = transformer.code_dataset(ae, train["images"], train["poses"], flip=t["flip"])
    return transformer.train_transformer(codes, poses, t, RunFiles(Path(root)).transformer(spec),
                                         n_codes=ae.cfg.n_codes, progress=progress, runtime=runtime)


def train_clip(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], *, progress: bool = True,
               runtime: Runtime | None = None):
    """The run's domain CLIP (nothing to train when ``clip.pretrained_path`` names a file)."""
    return clip_for_run(root, cfg, progress=progress, runtime=runtime)


def run_stage(stage: str, root: str | Path, cfg: Mapping[str, Mapping[str, Any]], *, spec: str | None = None,
              mode: str | None = None, further: bool = False, progress: bool = True,
              runtime: Runtime | None = None) -> dict[str, Any]:
    """Train ``stage`` of the run in ``root`` (``kpnb train``); returns a JSON-able summary."""
    rt = runtime or current()
    if stage == "vq":
        out = {}
        for s in [spec] if spec else list(cfg["vq"]["specs"]):
            _, info = train_vq(root, cfg, s, progress=progress, runtime=rt)
            out[s] = {k: info[k] for k in ("steps", "seconds", "images_per_s")}
        return out
    if stage == "estimator":
        _, info = train_estimator(root, cfg, progress=progress, runtime=rt)
        return {k: v for k, v in info.items() if isinstance(v, (int, float))}
    if stage == "ldm":
        mode = mode or RunFiles(Path(root)).best_mode() or cfg["diffusion"]["modes"][0]
        _, res = train_ldm(root, cfg, spec or "f4", mode, further=further, progress=progress, runtime=rt)
    elif stage == "transformer":
        _, res = train_transformer(root, cfg, spec, progress=progress, runtime=rt)
    elif stage == "clip":
        _, info = train_clip(root, cfg, progress=progress, runtime=rt)
        return json.loads(json.dumps(info, default=str))
    else:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    return {"steps": res.step, "start_step": res.start_step, "seconds": res.seconds,
            "images_per_s": res.images_per_s, "checkpoint": str(res.checkpoint)}


# ---- the CLIP a run uses -------------------------------------------------------------------------------
def clip_for_run(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], *, progress: bool = True,
                 runtime: Runtime | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The CLIP of a run folder, shared by the filter's CLIP stage (notebook 01) and tuning (notebook 06).

    * ``clip.pretrained_path`` set: that open_clip file (:func:`load_pretrained`), nothing is trained.
    * otherwise the run's domain CLIP in ``<root>/checkpoints/clip``, trained there first if it is not
      complete. Its training pool is a *separate* synthetic pool (``<root>/clip_pool``, ``clip.n_images``
      candidates, data seed + 1), never the candidates it will filter: a CLIP that had seen the filtered
      images' labels would be judged on its own training set, where a pretrained CLIP never is.

    Returns ``(model in eval mode, info)``; ``info`` says which CLIP it is and, when one was trained, its
    training seconds and images/s. The model is on ``runtime``'s device (default: the current runtime's)."""
    from kpnb.models.clip import load_pretrained  # open_clip: imported only when the run's CLIP is needed
    from kpnb.train.clip import caption_variants, load_domain_clip, train_from_preset

    rt = runtime or current()
    c, d = cfg["clip"], cfg["data"]
    if c.get("pretrained_path"):
        return load_pretrained(c["pretrained_arch"], c["pretrained_path"], c.get("pretrained_tag"),
                               device=str(rt.device)), {
            "kind": "pretrained", "arch": c["pretrained_arch"], "path": str(c["pretrained_path"])}
    root = Path(root)
    ckpt = RunFiles(root).clip()
    info: dict[str, Any] = {"kind": "domain", "arch": "kpnb domain CLIP", "checkpoints": str(ckpt)}
    last = checkpoints.latest_checkpoint(ckpt)
    if last is not None and checkpoints.read_checkpoint_info(last).get("step") == c["steps"]:
        return load_domain_clip(ckpt, device=str(rt.device)), info
    pool = root / "clip_pool"
    if rt.is_main:
        synth.write_dataset(pool, n=c["n_images"], image_size=c["image_size"], render_size=d["render_size"],
                            seed=d["seed"] + 1, progress=progress, wide_share=d["wide_share"])
    rt.barrier()
    cands = kdata.load_candidates(pool, c["image_size"], progress=progress)
    if not cands.labels:
        raise ValueError(f"{pool}: no labels.jsonl - the domain CLIP's training pool must be synthetic")
    captions = [caption_variants(lab) for lab in cands.labels]
    model, result = train_from_preset(c, cands.images, captions, ckpt, progress=progress, runtime=rt)
    info.update(n_images=len(cands), train_seconds=result.seconds, train_images_per_s=result.images_per_s)
    return model, info


def distance_for_run(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], real_images: Any) -> "ImageDistance":
    """The :class:`ImageDistance` a notebook scores with: against ``real_images`` (all held-out images), in
    Inception features when the preset's ``quality.inception_weights`` names a file, else in the run's CLIP
    (:func:`kpnb.run.stages.clip_for_run`: the domain CLIP notebook 01 trained, or a pretrained one)."""
    from kpnb.evaluate.quality import ClipFeatures, ImageDistance, inception_features

    q = cfg["quality"]
    if q.get("inception_weights"):
        feats = inception_features(q["inception_weights"])
    else:
        model, info = clip_for_run(root, cfg, progress=False)
        feats = ClipFeatures(model, name=f"{info['kind']} CLIP")
    return ImageDistance(real_images, feats, kid_subset_size=int(q["kid_subset_size"]))
