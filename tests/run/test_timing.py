"""Where a run's time went: notebook marks and bar lines in progress.log, summed per notebook."""
import pytest

from kpnb.core import files, progress
from kpnb.run import timing


def test_duration_strings_read_back():
    for s in (0, 42, 133, 3599, 3900, 7260):
        text = progress.duration(s)
        assert progress.parse_duration(text) == (s if s < 3600 else s - s % 60)
    for bad in ("", "5x", "m", "12"):
        with pytest.raises(ValueError):
            progress.parse_duration(bad)


def test_time_table_splits_each_notebook_into_its_bars_and_the_rest(tmp_path, monkeypatch):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(progress.LOG_ENV, str(log))
    log.write_text("10:00:00  early bar  step 2/2 (100%)  elapsed 7s  done\n")  # before any mark
    progress.mark_notebook("03_vq_training")
    for _ in progress.bar(range(3), desc="vq-f4", disable=True):  # a real bar's lines: done in 0 s
        pass
    with open(log, "a") as f:
        f.write("10:01:00  vq-f8  step 5/10 (50%)  rec 0.1  elapsed 1m40s  left 1m40s\n"
                "10:02:00  vq-f8  step 10/10 (100%)  rec 0.05  elapsed 3m20s  done\n")
    progress.mark_notebook("04_ldm_training")
    with open(log, "a") as f:  # a training in two stretches, the second stopped
        f.write("10:05:00  ldm[grid]  step 100/400 (25%)  elapsed 1h02m  done\n"
                "10:06:00  ldm[grid]  step 150/400 (38%)  elapsed 30s  stopped\n")
    progress.mark_notebook("03_vq_training")  # run again: its first run's bars no longer count
    with open(log, "a") as f:
        f.write("10:09:00  vq-f16  step 10/10 (100%)  elapsed 50s  done\n")
    bars, unmarked = timing.notebook_bars(log)
    assert bars == {"03_vq_training": {"vq-f16": 50}, "04_ldm_training": {"ldm[grid]": 3750}}
    assert unmarked == {"early bar": 7}
    files.write_metrics(tmp_path, "03_vq_training", {}, preset="smoke", seconds=80)
    files.write_metrics(tmp_path, "04_ldm_training", {}, preset="smoke", seconds=4000)
    table = timing.time_table(tmp_path)
    assert "| 03_vq_training | 80 | vq-f16 50 | 30 |" in table
    assert "| 04_ldm_training | 4000 | ldm[grid] 3750 | 250 |" in table
    assert "| total | 4080 (68.0 min) | | |" in table and "early bar 7 s" in table


def test_the_first_run_bars_count_when_it_ran_once(tmp_path, monkeypatch):
    log = tmp_path / "progress.log"
    monkeypatch.setenv(progress.LOG_ENV, str(log))
    progress.mark_notebook("03_vq_training")
    for _ in progress.bar(range(2), desc="vq-f4", disable=True):
        pass
    assert timing.notebook_bars(log) == ({"03_vq_training": {"vq-f4": 0}}, {})
    assert timing.notebook_bars(tmp_path / "none.log") == ({}, {})
