import json

from kpnb.core import files
from kpnb.run import folder, report


def _metrics(root, stem, **m):
    files.write_metrics(root, stem, m, preset="smoke", seconds=12.0)


def test_report_tables_come_from_the_metrics_files(tmp_path):
    root = folder.run_dir(tmp_path / "r", "smoke")
    _metrics(root, "01_dataset_filtering", n_train=300, precision=0.99)
    _metrics(root, "03_vq_training", **{"f4.train_seconds": 120.0, "f4.train_steps": 100, "f4.psnr": 27.5})
    _metrics(root, "04_ldm_training", best_mode="skeleton", spec="f4",
             **{"estimator.train_seconds": 30.0, "grid.train_seconds": 60.0, "skeleton.train_seconds": 60.0, "long.train_seconds": 180.0,
                "f8.train_seconds": 30.0, "f8.mode": "skeleton"})
    _metrics(root, "05_sampling", best_mode="long", **{"pck_ceiling@0.1": 0.9, "long.pck@0.1": 0.72,
                                                       "f8.pck@0.1": 0.45, "grid.pck@0.1": 0.1, "long.mode": "skeleton",
                                                       "ap_ceiling": 0.8, "long.ap": 0.6, "grid.ap": 0.05})
    (root / "figures" / "03_vq_training_reconstructions.png").write_bytes(b"png")
    (root / "figures" / "08_blog_figures_systems.png").write_bytes(b"png")
    systems = report.systems_table(report.collect_metrics(root))
    assert [r["spec"] for r in systems] == ["vq-f4", "vq-f8"]  # no transformer metrics: no invented row
    assert systems[0]["PCK@0.1"] == "0.72" and systems[0]["of ceiling"] == "0.8" and systems[0]["train time"] == "3.0 min"
    assert systems[0]["AP (OKS)"] == "0.6" and systems[0]["AP of ceiling"] == "0.75" and systems[1]["AP (OKS)"] == "-"
    acc = report.pose_accuracy_table(report.collect_metrics(root))
    assert [r["model"] for r in acc] == ["estimator on exact renders (ceiling)", "diffusion f8", "diffusion grid",
                                         "diffusion long (skeleton trained further)"]
    assert acc[0]["AP"] == "0.8" and acc[2]["AP"] == "0.05" and acc[2]["PCK@0.1"] == "0.1"
    train = report.training_table(report.collect_metrics(root))
    assert ("vq-f4", "2.0 min") in [(r["spec"], r["time"]) for r in train]
    systems_trained = [r["system"] for r in train]
    assert "diffusion (grid)" in systems_trained and "pose estimator (the PCK ruler)" in systems_trained
    assert "diffusion (estimator)" not in systems_trained
    path = report.write_report(root, {"08_blog_figures_systems.png": "samples per system"})
    text = path.read_text()
    assert "| 02_keypoint_inspection | not run | - |" in text
    assert "![samples per system](figures/08_blog_figures_systems.png)" in text
    assert "## Image quality" in text
    assert "## Pose accuracy per model" in text and "| diffusion grid | - | 0.1 | - | 0.05 |" in text
    assert "figures/03_vq_training_reconstructions.png" in text and "| f4.psnr | 27.5 |" in text
    assert json.loads((root / "config.json").read_text())["preset"] == "smoke" and "Preset `smoke`" in text


def test_quality_table_has_the_floor_every_generator_and_n():
    m = {"03_vq_training": {"f4.fid": 1.5, "f8.fid": 3.0, "n_val": 300},
         "05_sampling": {"best_mode": "skeleton", "skeleton.pck@0.1": 0.8, "skeleton.fid": 4.0,
                         "skeleton.fid_spread": 0.2, "skeleton.kid": 0.01, "grid.pck@0.1": 0.1, "fid_n_fake": 128,
                         "fid_real_same_n": 2.1, "fid_recon_same_n": 2.3},
         "07_cond_transformer": {"fid": 9.0, "n_eval": 200, "spec": "f16"},
         "06_clip_tuning": {"samples.fid": 5.0, "f4.fid_tuned": 6.0, "fid_n_fake": 32}}
    rows = {r["images"]: r for r in report.quality_table(m)}
    same_n = ["training images, as many as the samples (a perfect generator)",
              "vq-f4 reconstructions of those training images (a perfect generator through f4)"]
    assert list(rows) == ["vq-f4 reconstructions (floor)", "vq-f8 reconstructions (floor)", *same_n,
                          "diffusion skeleton", "transformer (f16)", "diffusion samples before CLIP tuning",
                          "CLIP-tuned through vq-f4"]
    assert rows[same_n[1]]["FID"] == "2.3" and rows[same_n[1]]["n"] == "128"
    assert rows["diffusion skeleton"]["FID"] == "4" and rows["diffusion skeleton"]["+-"] == "0.2"
    assert rows["diffusion skeleton"]["n"] == "128" and rows["vq-f4 reconstructions (floor)"]["n"] == "300"
    assert "diffusion grid" not in rows  # no FID measured: no row, nothing filled in


def test_claims_compare_the_numbers_and_say_what_is_not_measured():
    m = {"03_vq_training": {"f4.head_psnr": 24.0, "f8.head_psnr": 19.0, "f4.head_fid": 1.0, "f8.head_fid": 3.0,
                            "f4.psnr": 26.0, "f8.psnr": 20.0},
         "05_sampling": {"best_mode": "skeleton", "skeleton.pck@0.1": 0.8, "f8.pck@0.1": 0.9, "skeleton.fid": 5.0,
                         "f8.fid": 6.0},
         "07_cond_transformer": {"pck@0.1": 0.2, "fid": 9.0}}
    text = "\n".join(report.claims(m))
    assert "detail that f4 keeps**: supported" in text and "24 dB vs f8 19 dB" in text
    assert "best diffusion results**: mixed" in text  # f8 had the higher PCK here
    assert "transformer over f16 codes**: supported" in text
    assert "overfits after about 20 epochs**: not measured" in text
    assert report.claims({})[-2:] == report.claims(m)[-2:]  # nothing measured: only the unmeasured claims
    # the curve turns: held-out loss up after its minimum while the training loss goes on down
    curve = {"curve.epochs": [5.0, 10.0, 20.0], "curve.val_loss": [0.30, 0.28, 0.31],
             "curve.train_loss": [0.30, 0.27, 0.22], "curve.fid": [9.0, 7.0, 8.0], "curve.n_fid": 64, "curve.n_train": 300}
    assert "overfitting seen here from about epoch 10" in report._overfit_claim(curve)
    assert "no overfitting up to epoch 20" in report._overfit_claim({**curve, "curve.val_loss": [0.3, 0.28, 0.27]})
    strict = {"strict_compare.loose.pck@0.1": 0.80, "strict_compare.strict.pck@0.1": 0.70,
              "strict_compare.n_train.loose": 3000, "strict_compare.n_train.strict": 1000}
    assert "hurt** (363k vs 101k images): supported here - PCK@0.1 on the held-out poses 0.8" in report._strict_claim(strict)
    assert "no clear difference" in report._strict_claim({**strict, "strict_compare.strict.pck@0.1": 0.79})
    assert "not supported" in report._strict_claim({**strict, "strict_compare.strict.pck@0.1": 0.9})
    rows = report.strict_table({"04_ldm_training": strict})
    assert [r["trained on"] for r in rows] == ["loose", "strict"] and rows[1]["images"] == "1000"


def test_status_table_reads_the_metrics_files(tmp_path):
    from kpnb.core import files
    from kpnb.run import folder, status

    folder.run_dir(tmp_path, "smoke")
    files.write_metrics(tmp_path, "03_vq_training", {"f4.psnr": 26.7, "f4.codebook_used_fraction": 1.0,
                                                    "f4.train_seconds": 258.0, "f4.latent_channels": 8,
                                                    "f4.code_groups": 4, "f4.n_codes": 256}, preset="smoke", seconds=800)
    table = status.status_table(tmp_path)
    assert "**26.70 dB**" in table and "100%" in table and "The `smoke` preset (overrides `{}`" in table
    assert tmp_path.name not in table
    assert "| 01 filtering | not run |" in table  # a missing notebook is never filled in
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{status.BEGIN}\nold table\n{status.END}\nrest\n")
    status.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert "old table" not in text and "26.70 dB" in text and text.startswith("intro\n") and text.endswith("rest\n")


def test_generators_table_names_every_diffusion_model_beside_the_transformer():
    m = {"04_ldm_training": {"grid.train_seconds": 10.0, "long.train_seconds": 40.0},
         "05_sampling": {"grid.pck@0.1": 0.2, "long.pck@0.1": 0.8, "long.mode": "skeleton",
                         "examples.pck@0.1": 0.5, "guidance_sweep.1.0.pck@0.1": 0.7}}
    table = report.generators_table(m, {"pck@0.1": 0.3, "train_seconds": 5.0}, "transformer (f16)")
    assert list(table) == ["diffusion grid", "diffusion skeleton longer", "transformer (f16)"]
    assert table["diffusion skeleton longer"]["pck@0.1"] == 0.8 and table["diffusion grid"]["train_seconds"] == 10.0
    assert table["transformer (f16)"]["pck@0.1"] == 0.3 and table["transformer (f16)"]["sample_images_per_s"] is None
    assert report.generators_table({}) == {}


def test_real_pose_numbers_reach_the_report_and_the_status_table_but_are_no_mode(tmp_path):
    from kpnb.run import status

    smp = {"best_mode": "long", "long.mode": "skeleton", "pck_ceiling@0.1": 0.97, "long.pck@0.1": 0.86,
           "long.pck@0.1.ratio": 0.89, "n_eval": 128, "real_poses.n": 78, "real_poses.pck@0.1": 0.35,
           "real_poses.pck@0.1.ratio": 0.79, "real_poses.ap": 0.04, "real_poses.ceiling.pck@0.1": 0.45,
           "real_poses.ceiling.ap": 0.1, "real_poses.ratio_to_heldout": 0.41}
    m = {"05_sampling": smp}
    assert report._scored_modes(smp) == ["long"] and list(report.generators_table(m)) == ["diffusion skeleton longer"]
    rows = {r["model"]: r for r in report.pose_accuracy_table(m)}
    real = [r for name, r in rows.items() if name.startswith("real poses")]
    assert len(real) == 2 and "78" in real[0]["model"] and "0.41 x its held-out" in real[1]["model"]
    assert real[0]["PCK@0.1"] == "0.45" and real[0]["AP"] == "0.1" and real[1]["PCK@0.1"] == "0.35"
    text = status._sampling(smp)
    assert "78 real COCO poses **0.350** (**0.41** x held-out" in text and "exact renders of them 0.450" in text
    assert "real_poses 0.350" not in text  # not listed among the equal-budget modes
    # as shares of each set's ceiling: 0.79 / 0.89
    assert "(0.8876 x as shares of each set's ceiling)" in real[1]["model"] and "ceiling 0.89 x held-out" in text
    assert "real COCO" not in status._sampling({k: v for k, v in smp.items() if not k.startswith("real_poses")})
    # sampled from completed poses: the as-annotated conditioning is a row of its own and named in the status
    both = {**smp, "real_poses.as_annotated.pck@0.1": 0.25, "real_poses.as_annotated.ap": 0.02,
            "real_poses.as_annotated.ceiling.pck@0.1": 0.4, "real_poses.as_annotated.ratio_to_heldout": 0.29}
    real = [r for r in report.pose_accuracy_table({"05_sampling": both}) if r["model"].startswith("real poses")]
    assert len(real) == 3 and "completed poses" in real[1]["model"] and real[1]["PCK@0.1"] == "0.35"
    assert "as given" in real[2]["model"] and "renders of it: 0.4" in real[2]["model"] and "0.29 x" in real[2]["model"]
    assert real[2]["PCK@0.1"] == "0.25" and real[2]["AP"] == "0.02"
    text = status._sampling(both)
    assert "78 real COCO poses, completed poses **0.350**" in text and "annotation as given 0.250, 0.29 x" in text


def test_pck_by_view_is_a_table_of_the_report_when_measured(tmp_path):
    smp = {"best_mode": "long", "by_view.heldout.front.pck@0.1": 0.86, "by_view.heldout.front.n": 110,
           "by_view.heldout.back.pck@0.1": 0.45, "by_view.heldout.back.n": 13,
           "by_view.real_poses.front.pck@0.1": 0.66, "by_view.real_poses.front.n": 50,
           "by_view.real_poses.side.pck@0.1": 0.5, "by_view.real_poses.side.n": 9}
    rows = report.view_table({"05_sampling": smp})
    assert [r["view"] for r in rows] == ["front", "side", "back"]
    assert rows[0] == {"view": "front", "held-out poses": "110", "held-out PCK@0.1": "0.86", "real poses": "50",
                       "real PCK@0.1": "0.66"}
    assert rows[1]["held-out poses"] == "-" and rows[2]["real PCK@0.1"] == "-"
    assert report.view_table({"05_sampling": {"best_mode": "long"}}) == []
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "05_sampling.json").write_text(json.dumps(smp))
    assert "### By view" in report.write_report(tmp_path).read_text()
    (tmp_path / "metrics" / "05_sampling.json").write_text(json.dumps({"best_mode": "long"}))
    assert "### By view" not in report.write_report(tmp_path).read_text()
    from kpnb.run import status
    both = {**smp, "by_view.real_poses.back.pck@0.1": 0.52, "by_view.real_poses.back.n": 18.0}   # a mean
    assert "seen from behind: held-out 0.450 (13 poses), real 0.520 (18)" in status._sampling(both)
    assert "seen from behind" not in status._sampling({"best_mode": "long"})


def _tuned(hf, changed, rate=0.5, drop=0.05):
    """06's metrics of one spec: the hair prompt and "colorful", with the edit measures of "colorful"."""
    return {"red_hair.rate_after": rate, "red_hair.pck@0.1_drop": drop, "red_hair.rate_after_draws": [rate, rate],
            "colorful.rate_after": 0.1, "colorful.pck@0.1_drop": 0.2, "colorful.saturation_before": 0.3,
            "colorful.saturation_after": 0.4, "colorful.edit.high_freq_share": hf,
            "colorful.edit.hair_colour.changed": changed}


def _tuning(**specs):
    return {"n_tune": 64, **{f"{s}.{k}": v for s, d in specs.items() for k, v in d.items()}}


def test_tuning_table_the_hair_bar_and_the_colorful_claim(tmp_path):
    tun = _tuning(f4=_tuned(0.7, 0.1), f8=_tuned(0.5, 0.2, rate=0.85, drop=0.08), f16=_tuned(0.2, 0.6, rate=0.9,
                                                                                            drop=0.2))
    rows = report.tuning_table({"06_clip_tuning": tun})
    assert [(r["spec"], r["prompt"]) for r in rows] == [(s, k) for s in ("f4", "f8", "f16")
                                                       for k in ("red_hair", "colorful")]
    assert rows[2]["rate after"] == "0.85 (draws 0.85 / 0.85)" and rows[1]["high-freq. share"] == "0.7"
    # f16's rate is high but its drop past 0.1; f8 meets both
    assert "met on f8 - f4 rate 0.5" in report.hair_target(tun) and "over 64 tuned images" in report.hair_target(tun)
    assert "not met on any spec" in report.hair_target(_tuning(f4=_tuned(0.7, 0.1)))
    claim = report._colorful_claim(tun)
    assert "pixel-wise on f4**: supported here - f4: high-frequency share 0.7, hair colour changed on 0.1" in claim
    assert "partly supported (f4's change" in report._colorful_claim(
        _tuning(f4=_tuned(0.7, 0.1), f16=_tuned(0.2, 0.05)))  # f16 smooth but no hair changed
    assert "not supported" in report._colorful_claim(_tuning(f4=_tuned(0.2, 0.5), f16=_tuned(0.7, 0.1)))
    assert "not measured" in report._colorful_claim(_tuning(f8=_tuned(0.5, 0.2)))
    folder.run_dir(tmp_path, "smoke")
    files.write_metrics(tmp_path, "06_clip_tuning", tun, preset="smoke", seconds=1.0)
    text = report.write_report(tmp_path).read_text()
    assert "## CLIP tuning" in text and "| f8 | red_hair | 0.85 (draws 0.85 / 0.85) | 0.08" in text
    assert "pixel-wise on f4**: supported" in text


def test_status_clip_line_has_the_rate_and_its_draws():
    from kpnb.run import status

    m = {"zero_shot.hair_colour": 0.9, "n_tune": 64, "tune_steps": 80, "f4.red_hair.rate_before": 0.2,
         "f4.red_hair.rate_after": 0.81, "f4.red_hair.rate_after_draws": [0.78, 0.84],
         "f4.red_hair.pck@0.1_before": 0.8, "f4.red_hair.pck@0.1_after": 0.75}
    line = status._clip(m)
    assert "'red hair' on 64 samples" in line and "f4 rate 0.20 -> **0.81** (draws 0.78 / 0.84)" in line
    assert "(drop **0.050**)" in line
