"""Smoke runs of the numbered notebooks through `kpnb run` (papermill), as a person's headless rerun would."""
import json

import pytest

from kpnb import cli
from kpnb.core import files as runs
from kpnb.core import settings
from kpnb.train import checkpoints as training

from helpers import exported_checkpoint

pytestmark = pytest.mark.slow

EXPECTED = {
    "01_dataset_filtering": ["n_candidates", "n_kept", "precision", "recall", "tags.removed_in_chain",
                             "image.removed_in_chain", "pose.removed_in_chain", "clip.removed_in_chain",
                             "without_clip.precision"],
    "02_keypoint_inspection": ["n_poses", "flip_twice_identity"],
    "03_vq_training": ["f4.psnr", "f4.mae", "f4.codebook_perplexity", "f4.codebook_used_fraction",
                       "f4.train_images_per_s", "f4.train_seconds", "f4.fid", "f16.kid", "fid_n_real",
                       "f4.head_psnr", "f8.head_fid", "n_heads"],
    "04_ldm_training": ["estimator.ceiling.pck@0.1", "grid.train_images_per_s", "tokens.final_loss",
                        "skeleton.val_loss"],
    "05_sampling": ["grid.pck@0.1", "tokens.pck@0.1", "skeleton.pck@0.05", "pck_ceiling@0.1",
                    "ddim50_images_per_s", "ddim50_images_per_s_guided", "grid.ap", "ap_ceiling", "examples.ap",
                    "skeleton.fid", "skeleton.fid_spread", "f8.kid", "fid_floor.f4", "diversity.ratio",
                    "f8.head_fid", "fid_real_same_n", "real_poses.n", "real_poses.pck@0.1", "real_poses.pck@0.1.arms",
                    "real_poses.ap", "real_poses.ceiling.pck@0.1", "real_poses.ratio_to_heldout",
                    "real_poses.pck@0.1_spread", "real_poses.as_annotated.pck@0.1"],
    "05b_released_model": ["n_example_poses", "notes"],  # the smoke run has no released checkpoint
    "06_clip_tuning": ["zero_shot.hair_colour", "attributes.hair_colour_accuracy", "f4.red_hair.rate_before",
                       "f4.red_hair.rate_after", "f4.red_hair.pck@0.1_after", "f4.colorful.clip_score_after",
                       "f4.red_hair.iterations_per_s", "samples.fid", "f4.fid_tuned"],
    "07_cond_transformer": ["train_images_per_s", "train_seconds", "final_loss", "val_loss", "pck@0.05", "pck@0.1",
                            "pck@0.2", "sample_images_per_s", "n_params", "ap", "fid", "fid_spread", "recon.fid"],
    "08_blog_figures": ["n_figures", "systems"],
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "smoke"
    log = out.parent / "settings_read.jsonl"
    with pytest.MonkeyPatch.context() as mp:  # each notebook logs the settings it read (runs.NotebookRun)
        mp.setenv(settings.SETTINGS_LOG_ENV, str(log))
        rc = cli.main(["run", "--preset", "smoke", "--out", str(out), "--no-progress",
                       "--only", ",".join(cli.notebook_key(k) for k in EXPECTED)])
    assert rc == 0
    return out


# read only on a path the smoke run does not take: with clip.pretrained_path naming a local open_clip file
# (kpnb.run.stages.clip_for_run; tests/models/test_clip.py loads a pretrained file)
READ_ON_OTHER_PATHS = {"clip.pretrained_arch", "clip.pretrained_tag"}


def test_every_setting_is_read(smoke_run):
    # a preset key no notebook reads is a dead setting: remove it or wire it up
    lines = (smoke_run.parent / "settings_read.jsonl").read_text().splitlines()
    read = set().union(*(json.loads(line)["read"] for line in lines))
    assert {json.loads(line)["notebook"] for line in lines} == set(EXPECTED)
    unread = sorted(f"{s}.{k}" for s, section in settings.BASE.items() for k in section
                    if f"{s}.{k}" not in read | READ_ON_OTHER_PATHS)
    assert not unread, f"settings no notebook reads: {unread}"


def test_section_readers_match_what_the_notebooks_read(smoke_run):
    """`kpnb run --resume -p` names the finished notebooks a changed setting would change: its map of who reads
    which section must cover what each notebook read in the smoke run."""
    for line in (smoke_run.parent / "settings_read.jsonl").read_text().splitlines():
        rec = json.loads(line)
        sections = {k.split(".")[0] for k in rec["read"]} - {"runtime"}
        assert sections <= set(cli.SECTION_READERS[cli.notebook_key(rec["notebook"])]), (rec["notebook"], sections)


def test_resume_with_a_new_setting_records_it_and_names_what_it_would_change(smoke_run, capsys):
    assert cli.main(["run", "--resume", str(smoke_run), "--only", "02", "--no-progress",
                     "-p", "transformer.top_k=50"]) == 0
    out = capsys.readouterr().out
    assert "recorded transformer.top_k=50" in out and "07_cond_transformer" in out and "03_vq" not in out
    assert json.loads((smoke_run / "config.json").read_text())["overrides"]["transformer.top_k"] == 50


@pytest.mark.parametrize("stem", list(EXPECTED))
def test_notebook_smoke(smoke_run, stem):
    m = json.loads((smoke_run / "metrics" / f"{stem}.json").read_text())
    for key in EXPECTED[stem]:
        assert key in m, f"{stem}: metric {key} missing"
    assert m["preset"] == "smoke" and m["seconds"] > 0 and m["torch_threads"] >= 1
    assert (smoke_run / "notebooks" / f"{stem}.ipynb").exists()
    assert (smoke_run / "REPORT.md").exists() or stem != "08_blog_figures"
    drawn = any(p.name.startswith(stem) for p in (smoke_run / "figures").iterdir())
    assert drawn or stem == "05b_released_model"  # it draws the released model's samples only


def test_notebook_05b_without_the_checkpoint_says_what_to_download(smoke_run):
    m = runs.read_metrics(smoke_run, "05b_released_model")
    assert "not set" in m["notes"] and not any(k.startswith("original.") for k in m)
    printed = (smoke_run / "notebooks" / "05b_released_model.ipynb").read_text()
    assert "Download the original project's keypoint latent-diffusion model" in printed
    assert "original_checkpoint=../data/checkpoints/original_ldm_keypoints.ckpt" in printed
    assert not any(k.startswith("original.") for k in runs.read_metrics(smoke_run, "05_sampling"))


def test_notebook_05_without_trained_models_says_to_run_04_first(tmp_path, capsys):
    rc = cli.main(["run", "--preset", "smoke", "--out", str(tmp_path / "r"), "--only", "05", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "05_sampling.ipynb failed" in err
    assert "no diffusion models of f4 yet - run notebook 04_ldm_training first" in err and "05b_released_model" in err


def test_notebook_05_scores_every_pose_under_one_view(smoke_run):
    m = json.loads((smoke_run / "metrics" / "05_sampling.json").read_text())
    for where, n in (("heldout", m["n_eval"]), ("real_poses", m["real_poses.n"])):
        counts = {k: v for k, v in m.items() if k.startswith(f"by_view.{where}.") and k.endswith(".n")}
        assert counts and sum(counts.values()) == n and all(isinstance(v, int) for v in counts.values())
        assert all(0 <= m[k[:-2] + ".pck@0.1"] <= 1 for k in counts)


def test_status_times_splits_each_notebook_of_the_run_into_its_bars(smoke_run, capsys):
    assert cli.main(["status", str(smoke_run), "--times"]) == 0
    out = capsys.readouterr().out
    rows = {line.split(" | ")[0].lstrip("| "): line for line in out.splitlines()}
    assert set(EXPECTED) <= set(rows) and "total" in rows
    assert "vq-f4" in rows["03_vq_training"] and "ldm[grid]" in rows["04_ldm_training"]
    assert "Bars before" not in out  # kpnb run marked every notebook


def test_resume_skips_finished_notebooks(smoke_run, capsys):
    before = {p.name: p.stat().st_mtime for p in (smoke_run / "metrics").iterdir()}
    assert cli.main(["run", "--resume", str(smoke_run), "--only", "01,02", "--no-progress"]) == 0
    assert "finished before, skipped" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime for p in (smoke_run / "metrics").iterdir()}


def test_rerun_runs_a_finished_notebook_again(smoke_run, capsys):
    before = (smoke_run / "metrics" / "02_keypoint_inspection.json").stat().st_mtime_ns
    assert cli.main(["run", "--resume", str(smoke_run), "--only", "02", "--rerun", "--no-progress"]) == 0
    assert "finished before" not in capsys.readouterr().out
    assert (smoke_run / "metrics" / "02_keypoint_inspection.json").stat().st_mtime_ns > before


def test_notebook_05b_samples_the_released_model_in_a_fresh_run_folder(tmp_path, capsys):
    """Only a released checkpoint (here one written by kpnb's exporter in the original layout) and a fresh run
    folder: notebook 05b samples it for the example poses with the original script's settings."""
    ckpt, _, _ = exported_checkpoint(tmp_path / "released.ckpt")
    root = tmp_path / "fresh"
    assert cli.main(["run", "--preset", "smoke", "--out", str(root), "--only", "05b", "--no-progress",
                     "-p", f"original_checkpoint={ckpt}"]) == 0
    m = runs.read_metrics(root, "05b_released_model")
    assert (m["original.steps"], m["original.eta"], m["original.guidance"]) == (50, 1.0, 1.0)
    assert m["original.checkpoint"] == str(ckpt) and m["n_example_poses"] == 2 and "notes" not in m
    assert not (root / "metrics" / "05_sampling.json").exists()
    assert (root / "figures" / "05b_released_model_original_checkpoint.png").stat().st_size > 1000
    assert json.loads((root / "config.json").read_text())["params"]["original_checkpoint"] == str(ckpt)
    capsys.readouterr()
    # a new value on --resume is recorded, and the finished notebook it would change is named
    assert cli.main(["run", "--resume", str(root), "--only", "05b", "--no-progress",
                     "-p", "original_checkpoint=other.ckpt"]) == 0
    out = capsys.readouterr().out
    assert "recorded original_checkpoint='other.ckpt'" in out and "05b_released_model" in out
    assert "finished before" in out
    assert json.loads((root / "config.json").read_text())["params"]["original_checkpoint"] == "other.ckpt"


def test_notebook_01_over_packed_shards_equals_the_pool_in_memory(smoke_run, tmp_path):
    """The smoke run's synthetic pool packed into shards and filtered shard by shard (shards_dir): the same
    stage table, precision, recall and split as notebook 01 in memory, the subset memory-mapped and equal."""
    import numpy as np

    from kpnb.data import shards
    from kpnb.data import subset as data

    size = settings.run_config(smoke_run)["data"]["image_size"]
    shards.pack(smoke_run / "dataset", tmp_path / "shards", size=size, shard_size=64, workers=1, progress=False)
    out = tmp_path / "r"
    assert cli.main(["run", "--preset", "smoke", "--out", str(out), "--only", "01", "--no-progress",
                     "-p", f"shards_dir={tmp_path / 'shards'}"]) == 0
    a, b = runs.read_metrics(smoke_run, "01_dataset_filtering"), runs.read_metrics(out, "01_dataset_filtering")
    assert b["pool_in"] == "shards" and b["n_kept"] > 0
    run_specific = {"seconds", "dataset", "pool_in", "torch_threads"}
    assert {k: v for k, v in a.items() if k not in run_specific} == \
        {k: v for k, v in b.items() if k not in run_specific}
    for split in ("train", "val"):
        x, y = data.load_subset(smoke_run, split), data.load_subset(out, split)
        assert isinstance(y["images"], np.memmap)
        for k in ("ids", "images", "poses", "captions"):
            np.testing.assert_array_equal(x[k], y[k])


def test_failing_notebook_reports_cell_error(tmp_path, capsys):
    # notebook 02 needs the subset of 01: run alone in an empty folder it must fail with a clear message
    rc = cli.main(["run", "--preset", "smoke", "--out", str(tmp_path / "r"), "--only", "02", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "02_keypoint_inspection.ipynb failed" in err and "run notebook 01_dataset_filtering first" in err


# The gpu preset with every size, step and count shrunk, its structure kept (its runtime, VQ levels and strides,
# the original UNet's levels, attention and epsilon target, eps prediction, cosine schedule)
GPU_TINY = {
    "runtime.workers": 2,
    "data.image_size": 64, "data.n_candidates": 240, "data.render_size": 64, "data.val_frac": 0.15,
    "filter.clip_min_score": 0.0,
    "vq.steps": 4, "vq.batch_size": 8, "vq.image_size": 64, "vq.disc_start": 2, "vq.disc_width": 8,
    "vq.reseed_every": 2, "vq.log_every": 1,
    "vq.models": {
        "f4": {"latent_channels": 3, "n_codes": 64, "code_groups": 1, "linear_path": False, "base_width": 8,
               "channel_mult": [1, 2, 4], "res_blocks": 1, "dec_res_blocks": 1, "stem": 1},
        "f8": {"latent_channels": 4, "n_codes": 64, "code_groups": 1, "linear_path": False, "base_width": 8,
               "channel_mult": [1, 2, 2, 4], "res_blocks": 1, "dec_res_blocks": 1, "stem": 1},
        "f16": {"latent_channels": 8, "n_codes": 64, "code_groups": 1, "linear_path": False, "base_width": 8,
                "channel_mult": [1, 1, 2, 2, 4], "res_blocks": 1, "dec_res_blocks": 1, "stem": 1}},
    "diffusion.steps": 4, "diffusion.batch_size": 8, "diffusion.warmup": 1, "diffusion.base": 16,
    "diffusion.num_res_blocks": 1, "diffusion.token_dim": 16, "diffusion.sample_steps": 3,
    "diffusion.n_eval": 8, "diffusion.best_steps": 4, "diffusion.n_select": 4,
    "estimator.steps": 4, "estimator.batch_size": 8, "estimator.width": 8, "estimator.image_size": 32,
    "estimator.n_train": 16, "estimator.n_val": 8,
    "clip.steps": 4, "clip.batch_size": 8, "clip.n_images": 48, "clip.warmup": 1, "clip.image_size": 32,
    "clip.patch_size": 8, "clip.width": 32, "clip.layers": 1, "clip.text_width": 32, "clip.text_layers": 1,
    "clip.context_length": 16, "clip.embed_dim": 32, "clip.attr_steps": 4, "clip.attr_width": 8,
    "clip.attr_depth": 2, "clip.tune_steps": 2, "clip.cutouts": 2, "clip.n_tune": 2,
    "transformer.n_layer": 1, "transformer.n_head": 2, "transformer.n_embd": 16, "transformer.warmup": 1,
    "transformer.steps": 4, "transformer.batch_size": 8, "transformer.n_eval": 8,
}


def test_every_notebook_runs_under_the_gpu_preset_at_tiny_sizes(tmp_path):
    out = tmp_path / "gpu"
    args = ["run", "--preset", "gpu", "--out", str(out), "--no-progress"]
    for key, value in GPU_TINY.items():
        args += ["-p", f"{key}={json.dumps(value)}"]
    assert cli.main(args) == 0
    for stem in EXPECTED:
        assert runs.read_metrics(out, stem)["preset"] == "gpu"
    cfg = settings.run_config(out)
    assert cfg["runtime"]["precision"] == "auto" and cfg["runtime"]["workers"] == 2
    info = json.loads(training.latest_checkpoint(out / "checkpoints" / "ldm-f4-grid").read_text())
    unet = info["config"]["ldm"]["unet"]
    assert unet["mults"] == [1, 2, 3, 4] and unet["attn_ds"] == [2, 4, 8] and info["config"]["ldm"]["prediction"] == "eps"
