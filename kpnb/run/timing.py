"""Where a run's time went: ``kpnb status RUN --times``.

Each notebook's seconds come from its metrics file; within them, the progress bars that ran in it (training,
encoding, sampling and tuning loops, read from ``RUN/progress.log``, where ``kpnb run`` marks each notebook's
start). What the bars leave is the notebook's "rest": evaluation, figures and loading. A notebook run again keeps
only its last run's bars, as its metrics keep only its last run's seconds.
"""
from __future__ import annotations

from pathlib import Path

from kpnb.core import progress
from kpnb.run import report


def notebook_bars(log: Path) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """({notebook: {bar: seconds}} of each notebook's last run, {bar: seconds} of bars before any notebook mark);
    a bar that ran in several stretches (a training resumed, a run in parts) is summed."""
    runs: dict[str, dict[str, int]] = {}
    unmarked: dict[str, int] = {}
    latest: dict[str, int] = {}  # each notebook's last part of the log
    lines = log.read_text().splitlines() if log.exists() else []
    for part, notebook, bar, seconds in progress.ended_bars(lines):
        if notebook is None:
            unmarked[bar] = unmarked.get(bar, 0) + seconds
            continue
        if latest.get(notebook) != part:  # a later run of the notebook starts its bars afresh
            latest[notebook], runs[notebook] = part, {}
        runs[notebook][bar] = runs[notebook].get(bar, 0) + seconds
    return runs, unmarked


def time_table(root: str | Path) -> str:
    """A markdown table: each finished notebook's seconds, its bars' seconds and the rest, and the total."""
    root = Path(root)
    bars, unmarked = notebook_bars(root / "progress.log")
    lines = ["| notebook | seconds | of which (progress bars) | rest |", "|---|---|---|---|"]
    total = 0.0
    for stem, metrics in report.collect_metrics(root).items():
        seconds = metrics.get("seconds")
        if seconds is None:
            continue
        mine = bars.get(stem, {})
        total += float(seconds)
        parts = ", ".join(f"{name} {s}" for name, s in mine.items()) or "-"
        lines.append(f"| {stem} | {float(seconds):.0f} | {parts} | {float(seconds) - sum(mine.values()):.0f} |")
    lines.append(f"| total | {total:.0f} ({total / 60:.1f} min) | | |")
    if unmarked:
        lines += ["", "Bars before the log's first notebook mark (a run from before kpnb run marked them): "
                  + ", ".join(f"{name} {s} s" for name, s in unmarked.items())]
    return "\n".join(lines) + "\n"
