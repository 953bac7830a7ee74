"""``kpnb sample``: images for any pose, from a kpnb run folder or the original project's released checkpoint.

    kpnb sample --pose data/poses --model outputs/my_run --out samples/       # the run's best diffusion model
    kpnb sample --pose people.json --model outputs/my_run --mode skeleton --n 8 --out samples/
    kpnb sample --pose openpose.json --model original_ldm_keypoints.ckpt --out samples/

Pose files (:func:`kpnb.poses.formats.read_pose_file`): the release JSON, COCO keypoint annotations, OpenPose
JSON (COCO-18 or BODY_25), or a folder of them. With a run folder, joints a file leaves unlabelled (COCO's
unseen face joints, legs out of the photograph) are first placed as the run's nearest training pose places
them (:func:`kpnb.poses.analysis.complete_poses`; ``--no-complete`` to sample them as given). For each pose it
writes ``<label>_<k>.png`` (k = 0..n-1), one ``contact_sheet.png`` (each skeleton beside its samples) and
``sample.json`` (every setting, the model's files with a hash of each checkpoint JSON, the poses sampled with
the joints completion placed, and the files written). The same seed gives the same images:
pose i's samples use seed ``seed + i``.

With the released model the defaults are the original script's (``scripts/sample_pose_diffusion.py``): DDIM
50 steps, eta 1.0, no guidance (it was trained without pose dropout); the command says so.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kpnb.core import files as runs
from kpnb.core.settings import run_config
from kpnb.data import folder as data
from kpnb.data import subset
from kpnb.diffusion import sampling
from kpnb.poses import analysis as pose_analysis
from kpnb.poses import formats as pose_formats
from kpnb.poses import pose as kp
from kpnb.run import figures
from kpnb.run.folder import RunFiles
from kpnb.train import checkpoints, vq
from kpnb.train import ldm as ldm_training

ORIGINAL_DEFAULTS = {"steps": 50, "eta": 1.0, "guidance": 1.0, "guidance_interval": None, "solver": "ddim"}


def _identity(folder_or_file: Path) -> dict[str, Any]:
    """Which checkpoint: its path, step and a hash of its JSON (or of the file itself)."""
    if folder_or_file.is_dir():
        js = checkpoints.latest_checkpoint(folder_or_file, verify=True)  # the one the loader reads
        info = json.loads(js.read_text())
        return {"path": str(js), "step": info.get("step"), "sha1": hashlib.sha1(js.read_bytes()).hexdigest()[:16]}
    h = hashlib.sha1()
    with open(folder_or_file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"path": str(folder_or_file), "sha1": h.hexdigest()[:16]}


def load_model(model: str | Path, *, mode: str | None = None, spec: str = "f4"):
    """(ldm, vq, info, defaults) for a run folder (its best diffusion model of ``spec``, or ``mode``'s) or a
    released ``.ckpt``. ``defaults``: the sampler settings that fit the model (the run's preset, or the
    original script's)."""
    model = Path(model)
    if model.is_dir():
        if not (model / "config.json").exists():
            raise FileNotFoundError(f"{model}: not a kpnb run folder (no config.json)")
        files = RunFiles(model)
        if mode:
            folder, label = files.ldm(spec, mode), mode
            if not files.has(folder):
                folder, label = files.ldm(spec, mode, further=True), f"{mode}, trained further"
        else:
            best = files.best_ldm(spec)
            if best is None:
                raise FileNotFoundError(f"{model}: no diffusion model of {spec} yet (run notebook 04, or name one "
                                        f"with --mode)")
            folder, label = best
        if not files.has(folder):
            raise FileNotFoundError(f"{folder}: no checkpoint of mode {mode!r} for {spec}")
        ldm, ae = ldm_training.load_ldm(folder), vq.load_vq(files.vq(spec))
        cfg = run_config(model)["diffusion"]
        info = {"kind": "kpnb run", "run": str(model), "model": label, "spec": spec,
                "ldm": _identity(folder), "vq": _identity(files.vq(spec))}
        return ldm, ae, info, sampling.sample_kwargs(cfg)
    if not model.exists():
        raise FileNotFoundError(f"{model}: no such run folder or checkpoint")
    from kpnb.original import ldm as original

    ldm, ae = original.load_original_ldm(model, verbose=False)
    return ldm, ae, {"kind": "released checkpoint", "ldm": _identity(model)}, dict(ORIGINAL_DEFAULTS)


def sample(poses: list[tuple[str, kp.Pose]], ldm, ae, out: str | Path, *, n: int = 4, seed: int = 0,
           size: int | None = None, progress: bool = True, **sampler: Any) -> list[Path]:
    """``n`` images per pose (pose i with seed ``seed + i``) into ``out``; returns the PNG paths."""
    from PIL import Image

    from kpnb.core.progress import bar

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, rows = [], []
    for i, (label, pose) in enumerate(bar(poses, desc="kpnb sample", disable=not progress, unit_label="pose")):
        arr = np.stack([pose.to_array()] * n)
        images = sampling.sample_images(ldm, ae, arr, batch_size=n, seed=seed + i, **sampler)
        if size:
            images = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.LANCZOS)) for im in images])
        side = images.shape[1]
        rows.append(kp.draw_skeleton(pose, side))
        for k, im in enumerate(images):
            path = out / f"{label}_{k}.png"
            Image.fromarray(im).save(path)
            written.append(path)
            rows.append(im)
    titles = []
    for label, _ in poses:
        titles += [label] + [""] * n
    figures.image_grid(rows, titles, ncols=n + 1, size=1.6, path=out / "contact_sheet.png")
    return written


def _sampler_settings(a: argparse.Namespace, defaults: Mapping[str, Any], T: int) -> dict[str, Any]:
    """The sampler's settings: those given on the command line, the model's ``defaults`` for the rest (eta 0 with
    the multistep solver, which is deterministic); ValueError for a guidance interval outside ``0..T``."""
    given = {"steps": a.steps, "eta": a.eta, "guidance": a.guidance, "guidance_interval": a.guidance_interval,
             "solver": a.solver}
    settings = {k: (v if v is not None else defaults[k]) for k, v in given.items()}
    if settings["solver"] == "dpmpp_2m" and a.eta is None:
        settings["eta"] = 0.0
    sampling.check_interval(settings["guidance_interval"], T)
    return settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kpnb sample", description="images for pose files (see kpnb.run.sample)")
    p.add_argument("--pose", action="append", required=True, help="pose file or folder (repeatable)")
    p.add_argument("--model", required=True, help="kpnb run folder, or the released LDM .ckpt")
    p.add_argument("--mode", help="run folder: conditioning mode (default: the run's best)")
    p.add_argument("--spec", default="f4", help="run folder: latents of this VQ (default f4)")
    p.add_argument("--n", type=int, default=4, help="samples per pose")
    p.add_argument("--steps", type=int, help="sampler steps (default: the preset's; released model 50)")
    p.add_argument("--solver", choices=sampling.SOLVERS,
                   help="ddim, or dpmpp_2m (DPM-Solver++(2M), eta 0) (default: the preset's; released model ddim)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: the preset's; released model 1.0)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (released model: 1, none)")
    p.add_argument("--guidance-interval", type=int, nargs=2, metavar=("LO", "HI"),
                   help="timesteps LO <= t < HI where guidance applies (default: the preset's; released model: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, help="resize the PNGs to this many pixels")
    p.add_argument("--person", type=int, help="COCO/OpenPose: only this person (index among the usable ones)")
    p.add_argument("--image-id", help="COCO: only this image's people")
    p.add_argument("--min-joints", type=int, default=4, help="skip people with fewer labelled joints")
    p.add_argument("--no-complete", dest="complete", action="store_false",
                   help="run folder: sample unlabelled joints as unlabelled (default: placed as the nearest "
                        "training pose places them)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)
    if a.n < 1:
        p.error("--n must be at least 1")
    try:
        poses, sources, skipped = [], [], []
        for src in a.pose:
            got, sk = pose_formats.read_pose_file(src, min_joints=a.min_joints, person=a.person, image_id=a.image_id)
            poses += got
            sources += [str(src)] * len(got)
            skipped += sk
        for msg in skipped:
            print(f"kpnb sample: {msg}", file=sys.stderr)
        if not poses:
            raise kp.PoseError("no usable pose in the given files")
        ldm, ae, info, defaults = load_model(a.model, mode=a.mode, spec=a.spec)
    except (kp.PoseError, FileNotFoundError, ValueError) as e:
        print(f"kpnb sample: {e}", file=sys.stderr)
        return 2
    try:
        settings = _sampler_settings(a, defaults, ldm.schedule.T)
    except ValueError as e:
        print(f"kpnb sample: {e}", file=sys.stderr)
        return 2
    filled = [[] for _ in poses]   # per pose: the joints completion placed
    if a.complete and info["kind"] == "kpnb run" and any((pose.vis == kp.MISSING).any() for _, pose in poses):
        try:
            ref = subset.load_subset(a.model, "train")["poses"]
        except data.DataError as e:
            print(f"kpnb sample: unlabelled joints left as they are (no training poses to complete them from: {e})",
                  file=sys.stderr)
        else:
            done = pose_analysis.complete_poses([pose for _, pose in poses], ref)
            filled = [[kp.JOINTS[j] for j in np.flatnonzero((pose.vis == kp.MISSING) & (d[:, 2] != kp.MISSING))]
                      for (_, pose), d in zip(poses, done)]
            poses = [(label, kp.Pose.from_array(d)) for (label, _), d in zip(poses, done)]
            n = sum(map(len, filled))
            print(f"kpnb sample: {n} unlabelled joint{'s' if n != 1 else ''} placed as the nearest training pose "
                  f"places them (kpnb.poses.analysis.complete_poses; --no-complete samples the poses as given)")
    if info["kind"] == "released checkpoint":
        print(f"kpnb sample: the released model; the original script's defaults unless given: DDIM "
              f"{ORIGINAL_DEFAULTS['steps']} steps, eta {ORIGINAL_DEFAULTS['eta']}, no guidance -> using {settings}")
    else:
        print(f"kpnb sample: {info['run']} model {info['model']} ({a.spec}); sampler {settings}")
    t0 = time.time()
    written = sample(poses, ldm, ae, a.out, n=a.n, seed=a.seed, size=a.size, progress=a.progress, **settings)
    runs.write_json(Path(a.out) / "sample.json", {
        "model": info, "sampler": settings, "n": a.n, "seed": a.seed, "size": a.size,
        # the pose sampled, as kpnb's [x, y, code] rows (the release format has no unlabelled joints), and the
        # joints completion placed
        "poses": [{"label": label, "source": src, "pose": pose.to_array().round(6).tolist(), "completed": f}
                  for (label, pose), src, f in zip(poses, sources, filled)],
        "skipped": skipped, "files": [str(w.name) for w in written] + ["contact_sheet.png"],
        "seconds": round(time.time() - t0, 2), "command": "kpnb sample " + " ".join(argv or sys.argv[1:])})
    print(f"kpnb sample: {len(written)} images of {len(poses)} pose(s) in {a.out} (contact_sheet.png, sample.json)")
    return 0
