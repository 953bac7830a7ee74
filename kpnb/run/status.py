"""The README's status table, written from a run folder's metrics files so that it cannot drift from them.

``kpnb status RUN`` prints the table; ``kpnb status RUN --readme README.md`` replaces the block between
:data:`BEGIN` and :data:`END` in the README. Every number is read from ``RUN/metrics/*.json`` (a notebook
that has not run shows as "not run"); the targets are the bars each stage is measured against. How each number is
defined: ``docs/metrics.md``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from kpnb.core import files as runs
from kpnb.run import report
from kpnb.run.folder import FURTHER

BEGIN = "<!-- status table: written by `kpnb status RUN --readme README.md`; do not edit by hand -->"
END = "<!-- end of status table -->"

Metrics = Mapping[str, Mapping[str, Any]]


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * float(v):.0f}%"


def _s(v: Any) -> str:
    return "-" if v is None else f"{float(v):.0f} s"


def _filtering(m: Mapping[str, Any]) -> str:
    return (f"{m['n_candidates']:,} candidates, {m['n_kept']:,} kept: precision **{_f(m['precision'], 4)}**, "
            f"recall **{_f(m['recall'])}**; without the CLIP stage {_f(m.get('without_clip.precision'), 4)} / "
            f"{_f(m.get('without_clip.recall'))}; the CLIP stage alone {_f(m.get('clip.precision_alone'))} / "
            f"{_f(m.get('clip.recall_alone'))}")


def _keypoints(m: Mapping[str, Any]) -> str:
    return (f"{m['n_poses']:,} training poses, {_pct(m.get('upper_body_share'))} upper-body crops; flip twice = "
            f"identity on {_pct(m.get('flip_twice_identity'))}")


def _vq(m: Mapping[str, Any]) -> str:
    specs = [s for s in ("f4", "f8", "f16") if f"{s}.psnr" in m]
    parts = [f"{s} ({m.get(f'{s}.latent_channels')} ch, {m.get(f'{s}.code_groups')} x {m.get(f'{s}.n_codes')} codes): "
             f"**{_f(m[f'{s}.psnr'], 2)} dB**, codes used {_pct(m.get(f'{s}.codebook_used_fraction'))}, "
             f"{_s(m.get(f'{s}.train_seconds'))} ({_f(m.get(f'{s}.train_images_per_s'), 0)} images/s)" for s in specs]
    total = sum(float(m.get(f"{s}.train_seconds") or 0) for s in specs)
    head = ", ".join(f"{s} {_f(m.get(f'{s}.head_psnr'), 2)} dB" for s in specs if f"{s}.head_psnr" in m)
    return ("held-out PSNR " + "; ".join(parts) + f"; {total / 60:.1f} min of training"
            + (f"; head region PSNR {head}" if head else ""))


def _diffusion(m: Mapping[str, Any]) -> str:
    modes = [k.split(".")[0] for k in m if k.endswith(".select_pck@0.1")]
    speed = [m.get(f"{mode}.train_images_per_s") for mode in modes]
    speed = [float(v) for v in speed if v is not None]
    rng = f"{min(speed):.0f}-{max(speed):.0f} images/s" if speed else "-"
    return (f"estimator ceiling PCK@0.1 **{_f(m.get('estimator.ceiling.pck@0.1'))}** "
            f"({_s(m.get('estimator.train_seconds'))}); {len(modes)} modes at one budget, best "
            f"({m.get('best_mode')}) trained further; **{float(m.get('diffusion_train_seconds_total') or 0) / 60:.1f} "
            f"min** of diffusion training, {rng}; UNet {_f(m.get('unet_forward_gflop_per_image'), 2)} GFLOP forward "
            f"per image")


def _sampling(m: Mapping[str, Any]) -> str:
    best = m.get("best_mode")
    modes = [k[: -len(".pck@0.1.ratio")] for k in m if k.endswith(".pck@0.1.ratio") and not k.startswith("real_poses")]
    equal = ", ".join(f"{mode} {_f(m.get(f'{mode}.pck@0.1'))} (AP {_f(m.get(f'{mode}.ap'))})" for mode in modes
                      if mode not in (FURTHER, best, "f8", "f16"))
    label = f"{m.get(f'{FURTHER}.mode')} trained further" if best == FURTHER else best
    sweep = "/".join(_f(m[k]) for k in m if k.startswith("guidance_sweep.") and k.endswith(".pck@0.1"))
    both = "real_poses.as_annotated.pck@0.1" in m   # sampled from completed poses and from the annotation
    raw = (f"; conditioned on the annotation as given {_f(m.get('real_poses.as_annotated.pck@0.1'))}, "
           f"{_f(m.get('real_poses.as_annotated.ratio_to_heldout'), 2)} x" if both else "")
    completed = ", completed poses" if both else ""
    real = (f"{m.get('real_poses.n')} real COCO poses{completed} **{_f(m['real_poses.pck@0.1'])}** "
            f"(**{_f(m.get('real_poses.ratio_to_heldout'), 2)}** x held-out; the estimator on exact renders of "
            f"them {_f(m.get('real_poses.ceiling.pck@0.1'))}; as shares of each set's ceiling "
            f"{_f(report.real_of_ceiling(m), 2)} x held-out{raw}); " if "real_poses.pck@0.1" in m else "")
    if "by_view.heldout.back.n" in m or "by_view.real_poses.back.n" in m:   # figures seen from behind
        real += (f"seen from behind: held-out {_f(m.get('by_view.heldout.back.pck@0.1'))} "
                 f"({int(m.get('by_view.heldout.back.n', 0))} poses), "
                 f"real {_f(m.get('by_view.real_poses.back.pck@0.1'))} ({int(m.get('by_view.real_poses.back.n', 0))}); ")
    return (f"PCK@0.1 on {m.get('n_eval')} held-out poses: {label} **{_f(m.get(f'{best}.pck@0.1'))}** "
            f"({_f(m.get(f'{best}.pck@0.1.ratio'), 2)} of the ceiling), keypoint AP **{_f(m.get(f'{best}.ap'))}** "
            f"(estimator's own {_f(m.get('ap_ceiling'))}), FID **{_f(m.get(f'{best}.fid'), 2)}** (as many training "
            f"images: {_f(m.get('fid_real_same_n'), 2)}, f4 reconstructions of them: {_f(m.get('fid_recon_same_n'), 2)}; "
            f"the held-out images' own f4 reconstructions: {_f(m.get('fid_floor.f4'), 2)}); "
            f"at the equal budget {equal}; "
            f"f8 {_f(m.get('f8.pck@0.1'))}; real-world example poses {_f(m.get('examples.pck@0.1'))}; {real}guidance "
            f"sweep {sweep}; DDIM 50 steps {_f(m.get('ddim50_images_per_s'), 1)} images/s "
            f"({_f(m.get('ddim50_images_per_s_guided'), 1)} guided)")


def _clip(m: Mapping[str, Any]) -> str:
    hair = next((k.split(".")[1] for k in m if k.startswith("f4.") and k.endswith("_hair.rate_after")), None)
    parts = []
    for s in ("f4", "f8", "f16"):
        p = f"{s}.{hair}"
        if f"{p}.rate_after" in m:
            before, after = m[f"{p}.pck@0.1_before"], m[f"{p}.pck@0.1_after"]
            draws = m.get(f"{p}.rate_after_draws")
            spread = f" (draws {' / '.join(_f(d, 2) for d in draws)})" if draws else ""
            parts.append(f"{s} rate {_f(m[f'{p}.rate_before'], 2)} -> **{_f(m[f'{p}.rate_after'], 2)}**{spread}, "
                         f"PCK@0.1 {_f(before)} -> {_f(after)} (drop **{_f(before - after)}**)")
    return (f"domain CLIP zero-shot hair colour **{_f(m.get('zero_shot.hair_colour'))}**; attribute classifier "
            f"{_f(m.get('attributes.hair_colour_accuracy'))}; '{(hair or '').replace('_', ' ')}' on "
            f"{m.get('n_tune')} samples, {m.get('tune_steps')} steps: " + "; ".join(parts))


def _transformer(m: Mapping[str, Any]) -> str:
    return (f"GPT over {m.get('spec')} codes ({float(m.get('n_params') or 0) / 1e6:.2f}M parameters), "
            f"{m.get('train_steps')} steps in {_s(m.get('train_seconds'))} "
            f"({_f(m.get('train_images_per_s'), 0)} images/s): PCK@0.1 **{_f(m.get('pck@0.1'))}** (its own "
            f"reconstructions: {_f(m.get('recon.pck@0.1'))}), FID {_f(m.get('fid'), 2)} (reconstructions "
            f"{_f(m.get('recon.fid'), 2)}); held-out loss {_f(m.get('val_loss'), 2)} nats/code "
            f"against {_f(m.get('val_loss_shuffled_poses'), 2)} with shuffled poses")


def _figures(all_m: Metrics) -> str:
    rows = report.systems_table(all_m)
    return "three-way table in REPORT.md: " + ", ".join(f"{r['system']} {r['spec']} {r['PCK@0.1']}" for r in rows)


# (stage, notebook, formatter, target)
ROWS: list[tuple[str, str, Callable[[Mapping[str, Any]], str], str]] = [
    ("01 filtering", "01_dataset_filtering", _filtering, "CLIP stage's contribution measured"),
    ("02 keypoints", "02_keypoint_inspection", _keypoints, "-"),
    ("03 VQ", "03_vq_training", _vq, "f4 >= 26 dB, >= 50% codes, ~15 min"),
    ("04 diffusion", "04_ldm_training", _diffusion, "ceiling >= 0.90, <= 45 min"),
    ("05 sampling", "05_sampling", _sampling, "best >= 0.75 and >= 0.8 x ceiling; real poses >= 0.8 x held-out"),
    ("06 CLIP", "06_clip_tuning", _clip, "zero-shot hair >= 0.9; tuning rate >= 0.8 with PCK drop <= 0.1"),
    ("07 transformer", "07_cond_transformer", _transformer, "-"),
]


def status_table(root: str | Path) -> str:
    """The markdown status table of a run folder, with a line naming the run, its preset and its date."""
    root = Path(root)
    m = report.collect_metrics(root)
    cfg = json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else {}
    files = sorted((root / "metrics").glob("*.json"))
    date = time.strftime("%Y-%m-%d", time.localtime(max(p.stat().st_mtime for p in files))) if files else "-"
    threads = sorted({str(v.get("torch_threads")) for v in m.values()})
    seconds = {stem: v.get("seconds") for stem, v in m.items()}
    # the block names the preset, not the folder: the README describes the project, and the lab log the runs
    lines = [f"The `{cfg.get('preset', '?')}` preset (overrides "
             f"`{json.dumps(cfg.get('overrides', {}))}`, {'/'.join(threads)} torch threads, metrics of {date}).", "",
             "| stage | result | target |", "|---|---|---|"]
    total = sum(float(s or 0) for s in seconds.values())
    per = ", ".join(f"{stem.split('_')[0]} {float(s):.0f} s" for stem, s in seconds.items() if s is not None)
    lines.append(f"| whole run | **{total / 60:.1f} min** of notebook time: {per} | one command <= 90 min |")
    for stage, stem, fmt, target in ROWS:
        result = "not run" if stem not in m else fmt(m[stem])
        lines.append(f"| {stage} | {result} | {target} |")
    lines.append(f"| 08 figures | {'not run' if '08_blog_figures' not in m else _figures(m)} | - |")
    return "\n".join(lines) + "\n"


def update_readme(readme: str | Path, root: str | Path) -> None:
    """Replace the status block of ``readme`` (between BEGIN and END) with the table of ``root``."""
    readme = Path(readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme}: no status block (the lines {BEGIN!r} ... {END!r})")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    runs.atomic_write_bytes(readme, (head + BEGIN + "\n" + status_table(root) + END + tail).encode())
