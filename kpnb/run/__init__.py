"""Runs: the run folder and everything that drives the notebooks and the ``kpnb`` command (every notebook;
notebook 08's report; the CLI).

:mod:`.folder` (run folders, the one place for their file names and metric keys, ``NotebookRun``),
:mod:`.stages` (one training stage of a run, for a notebook and ``kpnb train`` alike), :mod:`.filter` (``kpnb
data filter`` into a run's subset), :mod:`.figures` (grids, overlays, maps, curves), :mod:`.report`
(``REPORT.md``), :mod:`.status` (the README's status table), :mod:`.widgets` (the pose editor), :mod:`.sample`
(``kpnb sample``), :mod:`.bench` and :mod:`.bench_data` (``kpnb bench``).

May import every layer below it; only :mod:`kpnb.cli` sits above it.
"""
