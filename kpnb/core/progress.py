"""Progress bars that a headless run can watch: ``tqdm.auto`` bars that also write text lines to a file.

In JupyterLab every long loop shows a tqdm widget, as before. When ``$KPNB_PROGRESS_LOG`` names a file (``kpnb
run`` sets it to ``<run>/progress.log`` and prints the file's new lines on the console while a notebook runs),
each bar also appends a line there at its start, every ``$KPNB_PROGRESS_EVERY`` seconds (default 20) and at its
end::

    05:53:43  ldm[skeleton]  step 224/500 (45%)  loss 0.1207  images_per_s 74.03  elapsed 1m21s  left 1m39s

``kpnb run`` also writes a line before each notebook (:func:`mark_notebook`), so that ``kpnb status RUN --times``
(:mod:`kpnb.run.timing`) can say which notebook each bar's seconds belong to (:func:`ended_bars`).

Every loop of the package uses :func:`bar` (the training helper, latent encoding, dataset writing, sampling,
CLIP tuning), so a person sees which model, step/total, the last losses, speed and time left.
"""
from __future__ import annotations

import os
import time
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

LOG_ENV = "KPNB_PROGRESS_LOG"
EVERY_ENV = "KPNB_PROGRESS_EVERY"
NOTEBOOK_MARK = "notebook "  # ``kpnb run`` writes "HH:MM:SS  notebook <name>" before each notebook


def duration(seconds: float) -> str:
    """'42s', '2m13s', '1h05m'."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def parse_duration(text: str) -> int:
    """Seconds of a :func:`duration` string ('1h05m' -> 3900); ValueError on anything else."""
    rest, total = text, 0
    for unit, scale in (("h", 3600), ("m", 60), ("s", 1)):
        if unit in rest:
            num, rest = rest.split(unit, 1)
            total += int(num) * scale
    if rest or not text:
        raise ValueError(f"not a duration: {text!r}")
    return total


def _write(line: str) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError:  # progress lines are a courtesy: never stop the work for them
        pass


class Bar(tqdm):
    """A ``tqdm.auto`` bar (widget in a notebook, text in a terminal; ``disable`` hides it) that also reports
    to ``$KPNB_PROGRESS_LOG`` whatever ``disable`` says. ``set_postfix`` values (losses, speed) go into the
    lines; ``unit_label`` names the counted thing in them ("step", "image"); ``report=False`` writes none (e.g.
    every rank but 0)."""

    def __init__(self, iterable: Iterable | None = None, *args: Any, unit_label: str = "step", report: bool = True,
                 **kwargs: Any):
        self._log = report and bool(os.environ.get(LOG_ENV))
        self._every = float(os.environ.get(EVERY_ENV, 20))
        self._label = unit_label
        self._desc = kwargs.get("desc") or "progress"  # a disabled tqdm keeps no desc of its own
        self._count = int(kwargs.get("initial", 0))
        self._start_count = self._count
        self._t0 = self._last = time.monotonic()
        self._post: dict[str, Any] = {}
        self._closed = False
        self._iterating = False  # inside __iter__, which counts the items itself
        super().__init__(iterable, *args, **kwargs)
        self._report(force=True)

    def __iter__(self):
        # count here: a disabled tqdm's iterator never calls update(), a shown one calls it now and then with
        # the items since its last refresh, which update() must then not count again
        self._iterating = True
        try:
            for item in super().__iter__():
                yield item
                self._count += 1
                self._report()
        finally:
            self._iterating = False

    def update(self, n: float = 1) -> bool | None:
        out = super().update(n)
        if not self._iterating:
            self._count += int(n)
            self._report()
        return out

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        self._post = dict(ordered_dict or {}, **kwargs)
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._report(force=True, final=True)
        super().close()

    def _report(self, force: bool = False, final: bool = False) -> None:
        if not self._log:
            return
        now = time.monotonic()
        if not force and now - self._last < self._every:
            return
        self._last = now
        total = self.total
        done = self._count
        parts = [time.strftime("%H:%M:%S"), self._desc,
                 f"{self._label} {done}/{int(total)} ({100 * done / total:.0f}%)" if total else f"{self._label} {done}"]
        parts += [f"{k} {v}" for k, v in self._post.items()]
        elapsed = now - self._t0
        ran = done - self._start_count
        parts.append(f"elapsed {duration(elapsed)}")
        if final:
            parts.append("done" if not total or done >= total else "stopped")
        elif total and ran > 0:
            parts.append(f"left {duration(elapsed / ran * (total - done))}")
        _write("  ".join(parts))


def bar(iterable: Iterable | None = None, **kwargs: Any) -> Bar:
    """The progress bar every loop of the package uses (see the module docstring)."""
    kwargs.setdefault("dynamic_ncols", True)
    return Bar(iterable, **kwargs)


def note(text: str) -> None:
    """A free-form line in the progress log (e.g. a notebook's phase)."""
    _write(f"{time.strftime('%H:%M:%S')}  {text}")


def mark_notebook(name: str) -> None:
    """The line that opens a notebook's part of the log (:func:`ended_bars` reads it)."""
    note(NOTEBOOK_MARK + name)


def ended_bars(lines: Iterable[str]) -> Iterator[tuple[int, str | None, str, int]]:
    """(part, notebook, bar, seconds) of each bar that ended ("done" or "stopped") in progress-log ``lines``; the
    notebook is the last :func:`mark_notebook` line before it (None before any) and ``part`` counts those lines,
    so that two runs of one notebook stay apart."""
    part, notebook = 0, None
    for line in lines:
        parts = line.rstrip("\n").split("  ")
        if len(parts) == 2 and parts[1].startswith(NOTEBOOK_MARK):
            part, notebook = part + 1, parts[1][len(NOTEBOOK_MARK):]
        elif len(parts) >= 4 and parts[-1] in ("done", "stopped") and parts[-2].startswith("elapsed "):
            yield part, notebook, parts[1], parse_duration(parts[-2][len("elapsed "):])
