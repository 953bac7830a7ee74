"""The dataset filter's CLIP stage for a run: the run's CLIP (:func:`kpnb.run.stages.clip_for_run`) scoring each
candidate's "a single anime character with a visible pose" against the negatives, as notebook 01 runs it."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Mapping

from kpnb.core.runtime import Runtime
from kpnb.data import filtering
from kpnb.data.stream_filter import Stage, clip_stage
from kpnb.models.clip import clip_filter_scores
from kpnb.run.stages import clip_for_run


def clip_model_id(info: Mapping[str, Any]) -> str:
    """The name of a run's CLIP in the stage's fingerprint (its weights are not hashed): its kind and file or
    checkpoint folder, the same whether the CLIP was trained in this call or before."""
    return f"{info['kind']}: {info.get('path') or info.get('checkpoints')}"


def clip_stage_for_run(root: str | Path, cfg: Mapping[str, Mapping[str, Any]], *, min_score: float | None = None,
                       progress: bool = True, runtime: Runtime | None = None) -> tuple[Stage, dict[str, Any]]:
    """The CLIP stage (:func:`kpnb.data.stream_filter.clip_stage`) with the CLIP of the run folder ``root`` (a
    domain CLIP not trained yet is trained there first), keeping images whose score reaches ``min_score``
    (None: the run's ``filter.clip_min_score``). Returns (stage, the CLIP's info from :func:`clip_for_run`)."""
    model, info = clip_for_run(root, cfg, progress=progress, runtime=runtime)
    score = functools.partial(clip_filter_scores, model, positive=filtering.CLIP_POSITIVE,
                              negatives=filtering.CLIP_NEGATIVES)
    threshold = cfg["filter"]["clip_min_score"] if min_score is None else min_score
    return clip_stage(score, threshold, clip_model_id(info)), info
