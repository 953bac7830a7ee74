"""Notebook 01's filter chain as a run: the stages over the pool in memory or shard by shard, what the chain
keeps packed as the run's subset, and the tables and metrics the notebook prints and writes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from kpnb.data import filtering, stream_filter, subset
from kpnb.data.folder import Candidates, split_of
from kpnb.data.stream_filter import Stage


@dataclass
class FilterRun:
    """The chain's results: ``results`` and ``view`` over the candidates in memory (with shards: the preview the
    figures show), ``report`` and the ``pool_*`` fields over the whole pool."""

    results: list[filtering.StageResult]
    view: dict[str, Any]                  # filtering.report of the candidates in memory
    report: dict[str, Any]                # the stage table's numbers over the whole pool
    pool_results: list[filtering.StageResult]
    pool_suitable: np.ndarray | None      # ground truth per pool image; None without labels
    problem_counts: dict[str, int]        # skipped files by kind
    index: dict[str, Any] | None = None   # with shards: the merged kept index (stream_filter.merge)

    @property
    def keep(self) -> np.ndarray:
        """What the chain keeps of the candidates in memory."""
        return filtering.chain_keep(self.results)


def run_filter(cands: Candidates, stages: Sequence[Stage], shards_dir: str | Path = "", out_dir: str | Path = "",
               workers: int = 0) -> FilterRun:
    """Every stage over the candidates in memory; with ``shards_dir`` also over every shard of the packed pool into
    ``out_dir`` (resumable: a rerun goes on from the shards already done), whose merged report is the table."""
    results = filtering.run_chain(cands, list(stages))
    view = filtering.report(cands, results)
    if not shards_dir:
        return FilterRun(results, view, dict(view), results, cands.suitable, cands.problems.counts())
    stream_filter.filter_shards(shards_dir, out_dir, list(stages), workers=workers)
    index = stream_filter.merge(out_dir)
    pool_results, pool_suitable, problem_counts = stream_filter.pool_results(out_dir)
    return FilterRun(results, view, index["report"], pool_results, pool_suitable, problem_counts, index)


def stage_table(run: FilterRun) -> str:
    """The stage table: removed alone and in the chain, precision and recall of each, and the chain's."""
    return stream_filter.report_table({"report": run.report, "stages": [r.name for r in run.results]})


def fmt(v: Any) -> str:
    """A number of the stage table: 3 decimals, "-" for None (no labels)."""
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def without_last_stage(run: FilterRun) -> dict[str, Any]:
    """The whole pool's chain without its last stage (the CLIP stage): ``n_kept``, ``precision``, ``recall``."""
    keep = filtering.chain_keep(run.pool_results[:-1])
    precision, recall = filtering.precision_recall(keep, run.pool_suitable)
    return {"n_kept": int(keep.sum()), "precision": precision, "recall": recall}


def label_table(cands: Candidates, run: FilterRun) -> str:
    """What each stage removed in the chain, by ground-truth label, of the candidates in memory (which have
    labels)."""
    labels = sorted({lab["label"] for lab in cands.labels})
    total = {lab: sum(c["label"] == lab for c in cands.labels) for lab in labels}
    rows = [f"{'label':20} {'total':>6} " + " ".join(f"{r.name:>7}" for r in run.results) + "   left"]
    for lab in labels:
        removed = [run.view.get(f"{r.name}.removed_in_chain.{lab}", 0) for r in run.results]
        rows.append(f"{lab:20} {total[lab]:>6} " + " ".join(f"{x:>7}" for x in removed)
                    + f"   {total[lab] - sum(removed):>4}")
    return "\n".join(rows)


def save_kept(root: str | Path, cands: Candidates, kept: np.ndarray, val_frac: float, seed: int) -> dict[str, int]:
    """The kept candidates (indices ``kept``) split into train and val by the hash of their id
    (:func:`kpnb.data.folder.split_of`) and written as the run's ``subset/{train,val}.npz``. Returns the count
    per split."""
    split = np.array([split_of(cands.ids[i], val_frac, seed) for i in kept])
    counts = {}
    for name in ("train", "val"):
        sel = kept[split == name]
        labels = [cands.labels[i] if cands.labels else {} for i in sel]
        subset.save_subset(root, name, ids=[cands.ids[i] for i in sel], images=cands.images[sel],
                           poses=cands.poses[sel], captions=[lab.get("caption", "") for lab in labels],
                           attrs=[lab.get("attributes", {}) for lab in labels])
        counts[name] = len(sel)
    return counts


def filter_metrics(run: FilterRun, counts: Mapping[str, int], train_poses: np.ndarray, dataset: str,
                   pool_in: str) -> dict[str, Any]:
    """Notebook 01's metrics: the report's numbers (the chain's first), the split, the strict variant's count of
    the training subset (:data:`kpnb.data.filtering.STRICT_RULE`), where the pool came from, skipped files."""
    metrics = {k: run.report[k] for k in ("n_candidates", "n_kept", "precision", "recall")}
    metrics.update({k: v for k, v in run.report.items() if k not in metrics})
    metrics["n_train"], metrics["n_val"] = int(counts["train"]), int(counts["val"])
    metrics["strict.rule"] = filtering.STRICT_RULE
    metrics["strict.n_train"] = int(filtering.strict_keep(train_poses).sum())
    metrics["dataset"], metrics["pool_in"] = dataset, pool_in
    if run.pool_suitable is None:
        metrics["notes"] = "no ground-truth labels in this dataset: precision and recall cannot be computed"
    metrics.update({f"skipped.{k}": v for k, v in run.problem_counts.items()})
    return metrics
