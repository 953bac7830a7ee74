"""The dataset filter's CLIP stage of a run (kpnb.run.clip_stage), with the run's CLIP and its scores replaced."""
import numpy as np
import pytest
from test_filter_report import pool

from kpnb.data import filtering
from kpnb.data.stream_filter import describe_stage
from kpnb.run import clip_stage


def test_clip_stage_for_run_scores_with_the_runs_clip(monkeypatch):
    seen = {}

    def fake_scores(model, images, positive, negatives):
        seen.update(model=model, positive=positive, negatives=negatives)
        return np.linspace(0, 1, len(images)).astype(np.float32)

    info = {"kind": "domain", "arch": "kpnb domain CLIP", "checkpoints": "run/checkpoints/clip", "train_seconds": 3.0}
    monkeypatch.setattr(clip_stage, "clip_for_run", lambda root, cfg, **kw: ("the model", dict(info)))
    monkeypatch.setattr(clip_stage, "clip_filter_scores", fake_scores)
    cfg = {"filter": {"clip_min_score": 0.5}}
    stage, got = clip_stage.clip_stage_for_run("run", cfg)
    assert got == info
    result = stage(pool())
    assert seen == {"model": "the model", "positive": filtering.CLIP_POSITIVE, "negatives": filtering.CLIP_NEGATIVES}
    np.testing.assert_array_equal(result.keep, np.linspace(0, 1, 6) >= 0.5)
    fp = describe_stage(stage)
    assert fp["min_score"] == 0.5 and fp["model"] == "domain: run/checkpoints/clip"
    lower, _ = clip_stage.clip_stage_for_run("run", cfg, min_score=0.2)
    assert describe_stage(lower)["min_score"] == pytest.approx(0.2)


def test_clip_model_id_names_the_file_or_the_checkpoint_folder_alone():
    assert clip_stage.clip_model_id({"kind": "pretrained", "path": "/w/clip.pt", "arch": "ViT-B-32"}) == \
        "pretrained: /w/clip.pt"
    # a CLIP trained in this call carries its training time; its name must not change with it
    assert clip_stage.clip_model_id({"kind": "domain", "checkpoints": "c", "train_seconds": 4.0}) == \
        clip_stage.clip_model_id({"kind": "domain", "checkpoints": "c"}) == "domain: c"
