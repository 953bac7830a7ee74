"""``REPORT.md`` of a run folder: every metric of every notebook, the write-up's tables, every figure.

Notebook 08 calls :func:`write_report` at its end; it reads only what the notebooks wrote (``metrics/*.json``,
``figures/*.png``, ``config.json``), so a report can be rebuilt from any run folder, finished or not - a
missing notebook shows as "not run", never as an invented number.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from kpnb.core.files import atomic_write_bytes
from kpnb.poses.pose import VIEWS

NOTEBOOKS = ["01_dataset_filtering", "02_keypoint_inspection", "03_vq_training", "04_ldm_training",
             "05_sampling", "05b_released_model", "06_clip_tuning", "07_cond_transformer", "08_blog_figures"]


def collect_metrics(root: str | Path) -> dict[str, dict[str, Any]]:
    """``{notebook stem: metrics}`` for every metrics file of the run folder (notebooks not run are absent)."""
    out = {}
    for stem in NOTEBOOKS:
        p = Path(root) / "metrics" / f"{stem}.json"
        if p.exists():
            out[stem] = json.loads(p.read_text())
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v != v:
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v).replace("|", "\\|")


def _minutes(seconds: Any) -> str:
    return "-" if seconds is None else f"{float(seconds) / 60:.1f} min"


def training_table(m: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """The write-up's training table (system, spec, dataset, time) for this run: every model trained."""
    rows = []
    n_train = m.get("01_dataset_filtering", {}).get("n_train")
    vqm, ldm, tr = m.get("03_vq_training", {}), m.get("04_ldm_training", {}), m.get("07_cond_transformer", {})
    for spec in ("f4", "f8", "f16"):
        if f"{spec}.train_seconds" in vqm:
            rows.append({"system": "VQ autoencoder", "spec": f"vq-{spec}", "dataset": _fmt(n_train),
                         "steps": _fmt(vqm.get(f"{spec}.train_steps")), "time": _minutes(vqm[f"{spec}.train_seconds"])})
    if "estimator.train_seconds" in ldm:
        rows.append({"system": "pose estimator (the PCK ruler)", "spec": "-", "dataset": "exact renders",
                     "steps": _fmt(ldm.get("estimator.steps")), "time": _minutes(ldm["estimator.train_seconds"])})
    modes = sorted({k.split(".")[0] for k in ldm if k.endswith(".train_seconds")}
                   - {"f4", "f8", "f16", "long", "estimator", "strict_compare"})
    spec = ldm.get("spec", "f4")
    for mode in modes + (["long"] if "long.train_seconds" in ldm else []):
        name = f"diffusion ({ldm.get('best_mode')}, trained further: total time)" if mode == "long" else f"diffusion ({mode})"
        rows.append({"system": name, "spec": f"vq-{spec}", "dataset": _fmt(n_train),
                     "steps": _fmt(ldm.get(f"{mode}.train_steps")), "time": _minutes(ldm[f"{mode}.train_seconds"])})
    if "strict_compare.train_seconds" in ldm:
        rows.append({"system": f"diffusion ({ldm.get('strict_compare.mode')}, strict subset)", "spec": f"vq-{spec}",
                     "dataset": _fmt(ldm.get("strict_compare.n_train.strict")),
                     "steps": _fmt(ldm.get("strict_compare.steps")), "time": _minutes(ldm["strict_compare.train_seconds"])})
    for s in ("f8", "f16"):
        if f"{s}.train_seconds" in ldm:
            rows.append({"system": f"diffusion ({ldm.get(f'{s}.mode')})", "spec": f"vq-{s}", "dataset": _fmt(n_train),
                         "steps": _fmt(ldm.get(f"{s}.train_steps")), "time": _minutes(ldm[f"{s}.train_seconds"])})
    if "train_seconds" in tr:
        rows.append({"system": "conditional transformer", "spec": "vq-f16", "dataset": _fmt(n_train),
                     "steps": _fmt(tr.get("train_steps")), "time": _minutes(tr["train_seconds"])})
    return rows


def systems_table(m: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """The original's three-way comparison (f16 transformer, f4 diffusion, f8 diffusion) with PCK, keypoint AP
    and times."""
    ldm, smp, tr = m.get("04_ldm_training", {}), m.get("05_sampling", {}), m.get("07_cond_transformer", {})
    ceiling, ap_ceiling = smp.get("pck_ceiling@0.1"), smp.get("ap_ceiling")
    rows = []

    def row(system: str, spec: str, got: Mapping[str, Any], prefix: str, seconds: Any) -> None:
        pck, ap = got.get(f"{prefix}pck@0.1"), got.get(f"{prefix}ap")
        ratio = None if pck is None or not ceiling else float(pck) / float(ceiling)
        rows.append({"system": system, "spec": spec, "PCK@0.1": _fmt(pck), "of ceiling": _fmt(ratio),
                     "AP (OKS)": _fmt(ap), "AP of ceiling": _fmt(None if ap is None or not ap_ceiling
                                                                else float(ap) / float(ap_ceiling)),
                     "FID": _fmt(got.get(f"{prefix}fid")),
                     "train time": _minutes(seconds), "images/s (sampling)": _fmt(got.get(f"{prefix}sample_images_per_s"))})

    if "pck@0.1" in tr:
        row("conditional transformer", "vq-f16", tr, "", tr.get("train_seconds"))
    best = smp.get("best_mode")
    if best is not None:
        mode = ldm.get("best_mode") if best == "long" else best
        row(f"diffusion ({mode}{', trained further' if best == 'long' else ''})", f"vq-{ldm.get('spec', 'f4')}",
            smp, f"{best}.", ldm.get(f"{best}.train_seconds"))
    for s in ("f8", "f16"):
        if f"{s}.pck@0.1" in smp:
            row(f"diffusion ({ldm.get(f'{s}.mode')})", f"vq-{s}", smp, f"{s}.", ldm.get(f"{s}.train_seconds"))
    return rows


def real_of_ceiling(smp: Mapping[str, Any]) -> float | None:
    """Notebook 05's real-pose PCK@0.1 over its held-out one, each first divided by the estimator's ceiling on
    its own poses: how much of the real/held-out gap is the generator's rather than the ruler's."""
    real, held = smp.get("real_poses.pck@0.1.ratio"), smp.get(f"{smp.get('best_mode')}.pck@0.1.ratio")
    return real / held if real is not None and held else None


def pose_accuracy_table(m: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """Notebook 05's pose accuracy of every diffusion model: PCK beside COCO keypoint AP, the estimator's own
    numbers on exact renders (its ceiling) first."""
    smp = m.get("05_sampling", {})
    if not smp.get("best_mode"):
        return []
    cols = {"pck@0.05": "PCK@0.05", "pck@0.1": "PCK@0.1", "pck@0.2": "PCK@0.2", "ap": "AP", "ap@0.5": "AP@0.5",
            "ap@0.75": "AP@0.75"}
    ceiling = {c: smp.get(f"pck_ceiling@{c[4:]}" if c.startswith("pck") else f"{c}_ceiling") for c in cols}
    rows = [{"model": "estimator on exact renders (ceiling)", **{cols[c]: _fmt(v) for c, v in ceiling.items()}}]
    for mode in _scored_modes(smp):
        label = f"diffusion {mode}" + (f" ({smp['long.mode']} trained further)" if mode == "long" and "long.mode" in smp else "")
        rows.append({"model": label, **{cols[c]: _fmt(smp.get(f"{mode}.{c}")) for c in cols}})
    if "real_poses.pck@0.1" in smp:
        n = _fmt(smp.get("real_poses.n"))
        rows.append({"model": f"real poses (COCO, {n}): estimator on exact renders of them (their ceiling)",
                     **{cols[c]: _fmt(smp.get(f"real_poses.ceiling.{c}")) for c in cols}})
        completed = ", completed poses" if "real_poses.as_annotated.pck@0.1" in smp else ""
        rows.append({"model": f"real poses (COCO, {n}): diffusion {smp['best_mode']}{completed}, "
                              f"{_fmt(smp.get('real_poses.ratio_to_heldout'))} x its held-out PCK@0.1 "
                              f"({_fmt(real_of_ceiling(smp))} x as shares of each set's ceiling)",
                     **{cols[c]: _fmt(smp.get(f"real_poses.{c}")) for c in cols}})
        if completed:
            raw_ceiling = _fmt(smp.get("real_poses.as_annotated.ceiling.pck@0.1"))
            rows.append({"model": f"real poses (COCO, {n}): the same, conditioned on the annotation as given "
                                  f"(estimator on renders of it: {raw_ceiling}), "
                                  f"{_fmt(smp.get('real_poses.as_annotated.ratio_to_heldout'))} x",
                         **{cols[c]: _fmt(smp.get(f"real_poses.as_annotated.{c}")) for c in ("pck@0.1", "ap")}})
    return rows


def view_table(m: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """Notebook 05's PCK@0.1 of the best mode by the way the figure faces (kpnb.poses.analysis.pose_views), on the
    held-out poses and the completed real poses; empty for a run that did not measure it."""
    smp = m.get("05_sampling", {})
    rows = []
    for v in VIEWS:
        held, real = f"by_view.heldout.{v}.", f"by_view.real_poses.{v}."
        if held + "n" in smp or real + "n" in smp:
            rows.append({"view": v, "held-out poses": _fmt(smp.get(held + "n")),
                         "held-out PCK@0.1": _fmt(smp.get(held + "pck@0.1")),
                         "real poses": _fmt(smp.get(real + "n")), "real PCK@0.1": _fmt(smp.get(real + "pck@0.1"))})
    return rows


def quality_table(m: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """FID and KID (with the spread over sample seeds where there are several, and n) of everything that makes
    images: the VQ reconstructions (the floor), every diffusion model, the transformer, the CLIP-tuned images."""
    vq, smp, tun, tr = (m.get(k, {}) for k in ("03_vq_training", "05_sampling", "06_clip_tuning",
                                               "07_cond_transformer"))
    rows = []

    def row(name: str, got: Mapping[str, Any], prefix: str, n: Any) -> None:
        if got.get(f"{prefix}fid") is None:
            return
        rows.append({"images": name, "FID": _fmt(got.get(f"{prefix}fid")), "+-": _fmt(got.get(f"{prefix}fid_spread")),
                     "KID": _fmt(got.get(f"{prefix}kid")), "KID +-": _fmt(got.get(f"{prefix}kid_spread")), "n": _fmt(n)})

    for s in ("f4", "f8", "f16"):
        row(f"vq-{s} reconstructions (floor)", vq, f"{s}.", vq.get("n_val"))
    if smp.get("fid_real_same_n") is not None:
        rows.append({"images": "training images, as many as the samples (a perfect generator)",
                     "FID": _fmt(smp["fid_real_same_n"]), "+-": "-", "KID": _fmt(smp.get("kid_real_same_n")),
                     "KID +-": "-", "n": _fmt(smp.get("fid_n_fake"))})
    if smp.get("fid_recon_same_n") is not None:
        rows.append({"images": "vq-f4 reconstructions of those training images (a perfect generator through f4)",
                     "FID": _fmt(smp["fid_recon_same_n"]), "+-": "-", "KID": "-", "KID +-": "-",
                     "n": _fmt(smp.get("fid_n_fake"))})
    for mode in _scored_modes(smp):
        label = f"diffusion {mode}" + (f" ({smp['long.mode']} trained further)" if mode == "long" and "long.mode" in smp else "")
        row(label, smp, f"{mode}.", smp.get("fid_n_fake"))
    row(f"transformer ({tr.get('spec', 'f16')})", tr, "", tr.get("n_eval"))
    row("diffusion samples before CLIP tuning", tun, "samples.", tun.get("fid_n_fake"))
    for s in ("f4", "f8", "f16"):
        if f"{s}.fid_tuned" in tun:
            rows.append({"images": f"CLIP-tuned through vq-{s}", "FID": _fmt(tun[f"{s}.fid_tuned"]), "+-": "-",
                         "KID": "-", "KID +-": "-", "n": _fmt(tun.get("fid_n_fake"))})
    return rows


def head_table(m: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """The original's claim that f8 loses the eyes' and hair's detail that f4 keeps: PSNR and FID of the
    head region beside the whole image, for the reconstructions (03) and the samples (05, seed 0)."""
    vq, smp = m.get("03_vq_training", {}), m.get("05_sampling", {})
    rows = []
    for s in ("f4", "f8", "f16"):
        if f"{s}.head_psnr" in vq:
            rows.append({"images": f"vq-{s} reconstructions", "head PSNR": _fmt(vq[f"{s}.head_psnr"]),
                         "whole PSNR": _fmt(vq.get(f"{s}.psnr")), "head FID": _fmt(vq.get(f"{s}.head_fid")),
                         "whole FID": _fmt(vq.get(f"{s}.fid"))})
    for k in sorted(k for k in smp if k.endswith(".head_fid")):
        name = k[: -len(".head_fid")]
        rows.append({"images": f"diffusion samples ({name})", "head PSNR": "-", "whole PSNR": "-",
                     "head FID": _fmt(smp[k]), "whole FID": _fmt(smp.get(f"{name}.fid"))})
    return rows


def claims(m: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence per claim of the original write-up, saying what this run's numbers show (or that they do
    not measure it). The sentences only compare numbers; they never fill one in."""
    vq, ldm, smp, tr = (m.get(k, {}) for k in ("03_vq_training", "04_ldm_training", "05_sampling",
                                              "07_cond_transformer"))
    out = []
    h4, h8 = vq.get("f4.head_psnr"), vq.get("f8.head_psnr")
    if h4 is not None and h8 is not None:
        f4f, f8f = vq.get("f4.head_fid"), vq.get("f8.head_fid")
        verdict = "supported" if h4 > h8 and (f4f is None or f8f is None or f4f < f8f) else "not supported"
        out.append(f"**f8 loses the eyes' and hair's detail that f4 keeps**: {verdict} here - head-region PSNR of "
                   f"the reconstructions f4 {_fmt(h4)} dB vs f8 {_fmt(h8)} dB, head FID {_fmt(f4f)} vs {_fmt(f8f)} "
                   f"(whole image {_fmt(vq.get('f4.psnr'))} vs {_fmt(vq.get('f8.psnr'))} dB).")
    best = smp.get("best_mode")
    if best and "f8.pck@0.1" in smp:
        p4, p8, q4, q8 = smp.get(f"{best}.pck@0.1"), smp["f8.pck@0.1"], smp.get(f"{best}.fid"), smp.get("f8.fid")
        verdict = "supported" if p4 is not None and p4 > p8 and (q4 is None or q8 is None or q4 < q8) else "mixed"
        out.append(f"**f4 gives the best diffusion results**: {verdict} - PCK@0.1 f4 ({best}) {_fmt(p4)} vs f8 "
                   f"{_fmt(p8)}, FID {_fmt(q4)} vs {_fmt(q8)} (the f8 model trains the best mode's settings for "
                   f"{_fmt(ldm.get('f8.train_steps'))} steps).")
    if best and "pck@0.1" in tr:
        pd, pt, qd, qt = smp.get(f"{best}.pck@0.1"), tr["pck@0.1"], smp.get(f"{best}.fid"), tr.get("fid")
        verdict = "supported" if pd is not None and pd > pt else "not supported"
        out.append(f"**Diffusion beats the conditional transformer over f16 codes**: {verdict} on pose - PCK@0.1 "
                   f"{_fmt(pd)} vs {_fmt(pt)}; FID {_fmt(qd)} vs {_fmt(qt)}.")
    out.append(_overfit_claim(ldm))
    out.append(_strict_claim(ldm))
    tun = m.get("06_clip_tuning", {})
    if tun:
        out.append(_colorful_claim(tun))
    return out


def _tuning_runs(tun: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(spec, prompt key) of every tuning notebook 06 measured, in its order."""
    return [(k.split(".")[0], k.split(".")[1]) for k in tun if k.endswith(".rate_after") and k.count(".") == 2]


def _draws(v: Any) -> str:
    return "" if not v else " (draws " + " / ".join(_fmt(x) for x in v) + ")"


def tuning_table(m: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """Notebook 06, per spec and prompt: the attribute rate after tuning and the PCK@0.1 drop (each with its
    draws), saturation, and what the edit changed (kpnb.evaluate.edits): the high-frequency share of the change
    and the share of images whose hair colour the classifier now calls differently."""
    tun = m.get("06_clip_tuning", {})
    rows = []
    for s, key in _tuning_runs(tun):
        p = f"{s}.{key}."
        rows.append({"spec": s, "prompt": key, "rate after": _fmt(tun[p + "rate_after"]) + _draws(
                         tun.get(p + "rate_after_draws")),
                     "PCK@0.1 drop": _fmt(tun.get(p + "pck@0.1_drop")) + _draws(tun.get(p + "pck@0.1_drop_draws")),
                     "saturation": f"{_fmt(tun.get(p + 'saturation_before'))} -> {_fmt(tun.get(p + 'saturation_after'))}",
                     "high-freq. share": _fmt(tun.get(p + "edit.high_freq_share")),
                     "hair colour changed": _fmt(tun.get(p + "edit.hair_colour.changed"))})
    return rows


def hair_target(tun: Mapping[str, Any]) -> str | None:
    """Whether the attribute prompt met the workbook's bar on a spec: rate >= 0.8 with a PCK@0.1 drop <= 0.1."""
    runs = [(s, k) for s, k in _tuning_runs(tun) if k.endswith("_hair")]
    if not runs:
        return None
    met = [s for s, k in runs if tun[f"{s}.{k}.rate_after"] >= 0.8 and tun.get(f"{s}.{k}.pck@0.1_drop", 1) <= 0.1]
    parts = "; ".join(f"{s} rate {_fmt(tun[f'{s}.{k}.rate_after'])}{_draws(tun.get(f'{s}.{k}.rate_after_draws'))}, "
                      f"drop {_fmt(tun.get(f'{s}.{k}.pck@0.1_drop'))}" for s, k in runs)
    verdict = f"met on {', '.join(met)}" if met else "not met on any spec"
    return (f"**The hair prompt ({runs[0][1].replace('_', ' ')}) at a rate >= 0.8 with a PCK@0.1 drop <= 0.1**: "
            f"{verdict} - {parts} (over {_fmt(tun.get('n_tune'))} tuned images).")


def _colorful_claim(tun: Mapping[str, Any]) -> str:
    """The write-up's claim that tuning towards "colorful" is semantic on f16, struggles on f8 and is pixel-wise
    on f4, judged by the high-frequency share of the change (pixel-wise) and the hair colour calls it changed
    (semantic)."""
    specs = [s for s, k in _tuning_runs(tun) if k == "colorful" and f"{s}.colorful.edit.high_freq_share" in tun]
    head = "**\"colorful\" is semantic on f16, struggles on f8, is pixel-wise on f4**"
    if not {"f4", "f16"} <= set(specs):
        return f"{head}: not measured by this run (\"colorful\" was not tuned on f4 and f16 with the edit measures)."
    hf = {s: tun[f"{s}.colorful.edit.high_freq_share"] for s in specs}
    ch = {s: tun.get(f"{s}.colorful.edit.hair_colour.changed", 0.0) for s in specs}
    pixel_f4 = hf["f4"] == max(hf.values())
    semantic_f16 = hf["f16"] == min(hf.values()) and ch["f16"] == max(ch.values())
    verdict = ("supported" if pixel_f4 and semantic_f16 else
               "partly supported (f4's change is the most pixel-wise; f16's is not the most semantic)" if pixel_f4 else
               "partly supported (f16's change is the most semantic; f4's is not the most pixel-wise)" if semantic_f16
               else "not supported")
    parts = "; ".join(f"{s}: high-frequency share {_fmt(hf[s])}, hair colour changed on {_fmt(ch[s])} of the "
                      f"images, saturation {_fmt(tun.get(f'{s}.colorful.saturation_before'))} -> "
                      f"{_fmt(tun.get(f'{s}.colorful.saturation_after'))}, PCK@0.1 drop "
                      f"{_fmt(tun.get(f'{s}.colorful.pck@0.1_drop'))}" for s in specs)
    return (f"{head}: {verdict} here - {parts}. (High-frequency share: of the change's energy above 0.25 "
            f"cycles/pixel; colour noise puts about 0.8 there, a part recoloured as a whole far less.)")


def _overfit_claim(ldm: Mapping[str, Any]) -> str:
    ep, vl, tl, fid = (ldm.get(f"curve.{k}") for k in ("epochs", "val_loss", "train_loss", "fid"))
    if not ep or len(ep) < 2:
        return ("**The diffusion model overfits after about 20 epochs**: not measured by this run (the best mode "
                "is not trained past the equal budget).")
    turn = int(np.argmin(vl))
    if turn < len(ep) - 1 and vl[-1] > vl[turn] and tl[-1] < tl[turn]:
        verdict = f"overfitting seen here from about epoch {ep[turn]:.0f}"
    else:
        verdict = f"no overfitting up to epoch {ep[-1]:.0f} here (held-out loss still at its lowest at the last stop)"
    return (f"**The diffusion model overfits after about 20 epochs**: {verdict} - held-out loss "
            f"{' / '.join(_fmt(v) for v in vl)}, training loss {' / '.join(_fmt(v) for v in tl)}, FID (n="
            f"{_fmt(ldm.get('curve.n_fid'))}) {' / '.join(_fmt(v) for v in fid)} at epochs "
            f"{' / '.join(f'{e:.1f}' for e in ep)} on {_fmt(ldm.get('curve.n_train'))} training images.")


def _strict_claim(ldm: Mapping[str, Any]) -> str:
    k = "strict_compare."
    lo, st = ldm.get(k + "loose.pck@0.1"), ldm.get(k + "strict.pck@0.1")
    if lo is None or st is None:
        return ("**Filtering too hard hurt** (363k vs 101k images): not measured by this run "
                "(diffusion.strict_compare is off).")
    verdict = "supported" if st < lo - 0.03 else "not supported" if st > lo + 0.03 else "no clear difference"
    return (f"**Filtering too hard hurt** (363k vs 101k images): {verdict} here - PCK@0.1 on the held-out poses "
            f"{_fmt(lo)} trained on all {_fmt(ldm.get(k + 'n_train.loose'))} images vs {_fmt(st)} on the strict "
            f"{_fmt(ldm.get(k + 'n_train.strict'))} ({ldm.get(k + 'rule')}); on the held-out whole figures "
            f"{_fmt(ldm.get(k + 'loose.pck@0.1.whole'))} vs {_fmt(ldm.get(k + 'strict.pck@0.1.whole'))}, on the "
            f"others {_fmt(ldm.get(k + 'loose.pck@0.1.partial'))} vs {_fmt(ldm.get(k + 'strict.pck@0.1.partial'))}.")


def strict_table(m: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """Notebook 04's loose-vs-strict comparison: the best mode at the equal budget on each subset."""
    ldm, k = m.get("04_ldm_training", {}), "strict_compare."
    if k + "loose.pck@0.1" not in ldm:
        return []
    return [{"trained on": name, "images": _fmt(ldm.get(f"{k}n_train.{name}")),
             "PCK@0.1": _fmt(ldm.get(f"{k}{name}.pck@0.1")),
             f"whole figures (n={_fmt(ldm.get(k + 'n_eval.whole'))})": _fmt(ldm.get(f"{k}{name}.pck@0.1.whole")),
             "cropped or occluded": _fmt(ldm.get(f"{k}{name}.pck@0.1.partial")),
             "AP": _fmt(ldm.get(f"{k}{name}.ap")), "held-out loss": _fmt(ldm.get(f"{k}{name}.val_loss"))}
            for name in ("loose", "strict")]


def _scored_modes(smp: Mapping[str, Any]) -> list[str]:
    return sorted({k.split(".")[0] for k in smp if k.endswith(".pck@0.1")
                   and not k.startswith(("examples", "guidance", "real_poses"))})


GENERATOR_COLUMNS = ("train_images_per_s", "train_seconds", "pck@0.05", "pck@0.1", "pck@0.2", "ap",
                     "sample_images_per_s")


def generators_table(m: Mapping[str, Mapping[str, Any]], transformer: Mapping[str, Any] | None = None,
                     transformer_name: str = "transformer") -> dict[str, dict[str, Any]]:
    """Every diffusion model of notebooks 04/05 (training speed and time, PCK, sampling speed) and, given its
    row, the transformer: ``{name: {column: value}}`` with the columns of :data:`GENERATOR_COLUMNS`."""
    ldm, smp = m.get("04_ldm_training", {}), m.get("05_sampling", {})
    modes = _scored_modes(smp)

    def name(mode: str) -> str:
        return f"diffusion {smp['long.mode']} longer" if mode == "long" and "long.mode" in smp else f"diffusion {mode}"

    table = {name(mode): {"train_images_per_s": ldm.get(f"{mode}.train_images_per_s"),
                          "train_seconds": ldm.get(f"{mode}.train_seconds"),
                          **{c: smp.get(f"{mode}.{c}") for c in GENERATOR_COLUMNS[2:]}} for mode in modes}
    if transformer is not None:
        table[transformer_name] = {c: transformer.get(c) for c in GENERATOR_COLUMNS}
    return table


def markdown_table(rows: list[Mapping[str, str]]) -> str:
    if not rows:
        return "(nothing measured yet)\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(root: str | Path, extra_figures: Mapping[str, str] | None = None) -> Path:
    """Write ``<root>/REPORT.md`` and return its path. ``extra_figures``: figure file name -> caption for
    figures to list first (the write-up's), the rest are listed by notebook."""

    root = Path(root)
    m = collect_metrics(root)
    cfg = json.loads((root / "config.json").read_text()) if (root / "config.json").exists() else {}
    out = [f"# Run report: `{root.name}`", "",
           f"Preset `{cfg.get('preset', '?')}`, overrides `{json.dumps(cfg.get('overrides', {}))}`. "
           "Every number below is read from this folder's `metrics/*.json`; every figure is in `figures/`.", ""]
    out += ["## The three systems (the original's comparison)", "",
            "PCK@0.1 and COCO keypoint AP (OKS) of the pose estimator on samples for held-out poses, against the "
            "conditioning pose; 'of ceiling' divides by the estimator's own number on exact renders.", "",
            markdown_table(systems_table(m))]
    out += ["## Pose accuracy per model", "",
            "Notebook 05, held-out poses: PCK (share of visible joints within a x the pose's size) beside COCO "
            "keypoint AP (pycocotools' COCOeval: the estimator's pose and confidence as the detection, the "
            "conditioning pose as ground truth, its joints' bbox as the area; docs/metrics.md). The last two rows: "
            "the real-pose set (data/real_poses, COCO persons placed in the frame by their box), scored the same "
            "way; the target is a real-pose PCK@0.1 of at least 0.8 x the held-out one.", "",
            markdown_table(pose_accuracy_table(m))]
    if view_table(m):
        out += ["### By view", "",
                "The best mode's PCK@0.1 by the way the figure faces, read from the conditioning pose's shoulders "
                "(kpnb.poses.analysis.pose_views: 'back' when her left shoulder is on the image's left); the real poses "
                "completed, over the quality seeds.", "", markdown_table(view_table(m))]
    smp = m.get("05_sampling", {})
    out += ["## Image quality", "",
            f"FID and KID against all {_fmt(smp.get('fid_n_real'))} held-out images in {smp.get('fid_features', 'CLIP')} "
            f"features (kpnb.evaluate.quality; docs/metrics.md); '+-' is half the range over the sample seeds "
            f"{smp.get('fid_seeds', '')}. Numbers with different n are not comparable: FID grows as n shrinks.", "",
            markdown_table(quality_table(m))]
    out += ["### The head region: f4 against f8", "",
            "The original said f8 loses the eyes' and hair's detail that f4 keeps: the same numbers on a square "
            "around each pose's head joints (kpnb.evaluate.quality.head_boxes), beside the whole image.", "",
            markdown_table(head_table(m))]
    ldm = m.get("04_ldm_training", {})
    out += ["## Loose or strict filtering", "",
            f"Notebook 04: the best mode ({ldm.get('strict_compare.mode', '-')}) at the equal budget, trained on the "
            f"whole subset and on its strict part ({ldm.get('strict_compare.rule', '-')}), scored on the same "
            f"{_fmt(ldm.get('strict_compare.n_eval'))} held-out poses as notebook 05.", "",
            markdown_table(strict_table(m))]
    tun = m.get("06_clip_tuning", {})
    if tuning_table(m):
        out += ["## CLIP tuning", "",
                f"Notebook 06: {_fmt(tun.get('n_tune'))} samples of the best mode tuned through each VQ (the draws: "
                "equal parts of them, measured apart). Rate: the attribute classifier's share of images with the "
                "asked hair colour; the drop: PCK@0.1 of the reconstruction less that of the tuned image.", "",
                markdown_table(tuning_table(m)), hair_target(tun) or "", ""]
    out += ["## The original write-up's claims, against this run", ""] + [f"- {c}" for c in claims(m)] + [""]
    out += ["## Training table", "", markdown_table(training_table(m))]
    out += ["## Notebooks", "", "| notebook | seconds | torch threads |", "|---|---|---|"]
    for stem in NOTEBOOKS:
        mm = m.get(stem)
        out.append(f"| {stem} | {_fmt(mm.get('seconds')) if mm else 'not run'} | "
                   f"{_fmt(mm.get('torch_threads')) if mm else '-'} |")
    out.append("")
    figs = sorted(p.name for p in (root / "figures").glob("*.png")) if (root / "figures").is_dir() else []
    if extra_figures:
        out += ["## The write-up's figures", ""]
        for name, caption in extra_figures.items():
            if name in figs:
                out += [f"**{caption}**", "", f"![{caption}](figures/{name})", ""]
    for stem in NOTEBOOKS:
        mm = m.get(stem)
        mine = [f for f in figs if f.startswith(stem) and f not in (extra_figures or {})]
        if not mm and not mine:
            continue
        out += [f"## {stem}", ""]
        if mm:
            out += ["| metric | value |", "|---|---|"]
            out += [f"| {k} | {_fmt(v)} |" for k, v in mm.items()]
            out.append("")
        out += [f"![{f}](figures/{f})" for f in mine]
        out.append("")
    path = root / "REPORT.md"
    atomic_write_bytes(path, "\n".join(out).encode())
    return path
