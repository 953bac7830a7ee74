import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from kpnb import cli
from kpnb.core import files, lock, settings
from kpnb.run import folder

from helpers import dead_pid, leaves, other_holder


def test_preset_config_overrides_and_refusals():
    cfg = settings.preset_config("smoke", {"data.n_candidates": 10})
    assert cfg["data"]["n_candidates"] == 10
    assert settings.PRESETS["smoke"]["data"]["n_candidates"] != 10  # presets are not mutated
    with pytest.raises(settings.ConfigError, match="valid presets: smoke, cpu, gpu"):
        settings.preset_config("fast")
    with pytest.raises(settings.ConfigError, match="'data.nope'; valid settings of 'data': image_size"):
        settings.preset_config("smoke", {"data.nope": 1})
    with pytest.raises(settings.ConfigError, match="valid sections"):
        settings.preset_config("smoke", {"nosection.x": 1})
    with pytest.raises(settings.ConfigError, match="expects int"):
        settings.preset_config("smoke", {"data.n_candidates": "many"})


@pytest.mark.parametrize("preset", list(settings.PRESETS))
def test_every_preset_has_every_base_key(preset):
    # presets are BASE plus a delta: a key the code reads under one preset exists under all of them
    assert set(leaves(settings.PRESETS[preset])) == set(leaves(settings.BASE))
    assert settings.preset_config(preset) == settings.PRESETS[preset]


def test_preset_delta_with_unknown_key_is_refused():
    with pytest.raises(KeyError, match="smoke: diffusion.stepz"):
        settings._merged(settings.BASE, {"diffusion": {"stepz": 1}}, "smoke: ")
    merged = settings._merged(settings.BASE, {"vq": {"models": {"f8": {"n_codes": 7}}}}, "x: ")
    assert merged["vq"]["models"]["f8"]["n_codes"] == 7
    assert merged["vq"]["models"]["f8"]["base_width"] == settings.BASE["vq"]["models"]["f8"]["base_width"]
    assert settings.BASE["vq"]["models"]["f8"]["n_codes"] != 7  # BASE is not mutated


def test_settings_read_log(tmp_path, monkeypatch):
    log = tmp_path / "read.jsonl"
    monkeypatch.setenv(settings.SETTINGS_LOG_ENV, str(log))
    nb = folder.NotebookRun("01_x", "smoke", str(tmp_path / "run"))
    assert nb.cfg["data"]["seed"] == 0 and nb.cfg["vq"].get("steps") == 6
    nb.finish({})
    runtime_keys = [f"runtime.{k}" for k in sorted(settings.BASE["runtime"])]  # every notebook reads them at start
    assert json.loads(log.read_text()) == {"notebook": "01_x", "read": ["data.seed", *runtime_keys, "vq.steps"]}


def test_run_dir_refuses_mixed_presets(tmp_path):
    folder.run_dir(tmp_path / "r", "smoke")
    assert json.loads((tmp_path / "r" / "config.json").read_text())["preset"] == "smoke"
    with pytest.raises(settings.ConfigError, match="smoke"):
        folder.run_dir(tmp_path / "r", "cpu")


def test_metrics_file(tmp_path):
    folder.run_dir(tmp_path, "smoke")
    p = files.write_metrics(tmp_path, "01_x", {"a": 1.5, "b": None, "notes": "why"}, preset="smoke", seconds=3.21)
    m = json.loads(p.read_text())
    assert m["a"] == 1.5 and m["b"] is None and m["preset"] == "smoke" and m["torch_threads"] >= 1
    with pytest.raises(TypeError, match="nested"):
        files.write_metrics(tmp_path, "01_x", {"a": {"b": 1}}, preset="smoke", seconds=0)


def test_atomic_write_leaves_no_temp_on_error(tmp_path):
    files.atomic_write_bytes(tmp_path / "f.bin", b"ok")
    with pytest.raises(TypeError):
        files.atomic_write_bytes(tmp_path / "f.bin", 12345)  # not bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    assert (tmp_path / "f.bin").read_bytes() == b"ok"


def test_every_notebook_has_parameters_and_no_outputs():
    nbs = cli.list_notebooks()
    assert len(nbs) >= 2
    for nb in nbs:
        params = cli.notebook_parameters(nb)
        for name in cli.COMMON_PARAMETERS:
            assert name in params, f"{nb.name} lacks parameter {name}"
        data = json.loads(nb.read_text())
        assert not any(c.get("outputs") for c in data["cells"] if c["cell_type"] == "code"), nb.name
        # nbformat 4.5 cells carry ids; one without makes every headless run warn (MissingIDFieldWarning)
        assert all("id" in c for c in data["cells"]), f"{nb.name}: a cell without an id"


def _kpnb(*args):
    return subprocess.run([sys.executable, "-m", "kpnb.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_refuses_unknown_preset_and_parameter(tmp_path):
    r = _kpnb("run", "--preset", "turbo", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "valid presets: smoke, cpu, gpu" in r.stderr
    assert not (tmp_path / "a").exists()  # refused before any work
    r = _kpnb("run", "--preset", "smoke", "--out", str(tmp_path / "b"), "-p", "colour=red")
    assert r.returncode == 2 and "unknown parameter 'colour'" in r.stderr and "dataset_dir" in r.stderr
    assert not (tmp_path / "b").exists()
    r = _kpnb("run", "--preset", "smoke", "--out", str(tmp_path / "c"), "-p", "vq.nope=3")
    assert r.returncode == 2 and "'vq.nope'" in r.stderr and "steps" in r.stderr
    r = _kpnb("run", "--preset", "smoke", "--out", str(tmp_path / "d"), "--only", "01,42")
    assert r.returncode == 2 and "42" in r.stderr


BAD_SETTINGS = [  # (-p pair, what the refusal names)
    ('diffusion.view_repeat={"sidee":2}',
     "'diffusion.view_repeat.sidee'; valid settings of 'diffusion.view_repeat': side, back"),
    ('vq.models={"f4":{"n_codez":512}}', "'vq.models.f4.n_codez'"),
    ("vq.models.f4.n_codez=512", "'vq.models.f4.n_codez'"),
    ("vq.steps=true", "'vq.steps' expects int"),
    ("clip.lr=fast", "'clip.lr' expects float"),
    ("vq.models=[1]", "'vq.models' expects a dict"),
    ('vq.steps={"a":1}', "'vq.steps' expects int"),
    ('diffusion.modes=["grid",3]', "'diffusion.modes' expects list of str"),
]


@pytest.mark.parametrize("pair, named", BAD_SETTINGS)
def test_run_and_train_refuse_a_bad_setting_before_any_work(tmp_path, capsys, pair, named):
    out = tmp_path / "run"
    assert cli.main(["run", "--preset", "smoke", "--out", str(out), "--only", "02", "-p", pair]) == 2
    assert named in capsys.readouterr().err and not out.exists()
    folder.run_dir(out, "smoke")
    config = (out / "config.json").read_text()
    assert cli.main(["train", "vq", "--run-dir", str(out), "-p", pair]) == 2
    assert named in capsys.readouterr().err
    assert (out / "config.json").read_text() == config and not any((out / "checkpoints").iterdir())


def test_resume_reads_back_the_recorded_deep_overrides(tiny_notebooks, tmp_path, capsys):
    _notebook(tiny_notebooks / "01_ok.ipynb", FINISH.replace("NAME", '"01_ok"'))
    run = tmp_path / "run"
    assert cli.main(["run", "--preset", "smoke", "--out", str(run), "--no-progress",
                     "-p", "vq.models.f4.n_codes=32"]) == 0
    assert cli.main(["run", "--resume", str(run), "--no-progress", "-p", 'diffusion.view_repeat={"back":1}']) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["overrides"] == {"vq.models.f4.n_codes": 32, "diffusion.view_repeat": {"back": 1}}
    cfg = settings.run_config(run)
    assert cfg == saved["settings"] and cfg["vq"]["models"]["f4"]["n_codes"] == 32
    assert cfg["diffusion"]["view_repeat"] == {"side": 2, "back": 1}
    assert "recorded diffusion.view_repeat={'back': 1}" in capsys.readouterr().out


def test_train_takes_its_run_folder_as_run_dir_only():
    # torchrun reads --run as its own --run-path: one spelling, no abbreviation
    with pytest.raises(SystemExit):
        cli.main(["train", "vq", "--run", "outputs/x"])


# ---- kpnb run: time-outs, dead kernels, progress lines -------------------------------------------------
def _notebook(path, *cells):
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('preset = "smoke"\nrun_dir = ""\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params] + [nbformat.v4.new_code_cell(c) for c in cells]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))


FINISH = 'from kpnb.run import folder\nnb = folder.NotebookRun(NAME, preset, run_dir, overrides)\nnb.finish({"ok": 1})'


@pytest.fixture
def tiny_notebooks(tmp_path, monkeypatch):
    folder = tmp_path / "nbs"
    folder.mkdir()
    monkeypatch.setattr(cli, "notebooks_dir", lambda: folder)
    return folder


def test_a_cell_past_the_timeout_stops_the_run_named_and_resumable(tiny_notebooks, tmp_path, capsys):
    _notebook(tiny_notebooks / "01_ok.ipynb", FINISH.replace("NAME", '"01_ok"'))
    _notebook(tiny_notebooks / "02_slow.ipynb", "x = 1", "import time\ntime.sleep(60)",
              FINISH.replace("NAME", '"02_slow"'))
    run = tmp_path / "run"
    rc = cli.main(["run", "--preset", "smoke", "--out", str(run), "--timeout", "15", "--no-progress"])  # 15 s: the kernel starts and imports torch within it on a busy machine too
    err = capsys.readouterr().err
    assert rc == 1
    assert "02_slow.ipynb timed out in cell 3 (import time)" in err and f"--resume {run}" in err
    assert (run / "metrics" / "01_ok.json").exists() and (run / "notebooks" / "02_slow.ipynb").exists()
    _notebook(tiny_notebooks / "02_slow.ipynb", "x = 1", FINISH.replace("NAME", '"02_slow"'))  # fixed
    assert cli.main(["run", "--resume", str(run), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "01_ok: finished before, skipped" in out and (run / "metrics" / "02_slow.json").exists()


def test_the_kernel_is_not_interrupted_on_its_way_out(tmp_path, monkeypatch):
    """jupyter_client interrupts every kernel before shutting it down; after a finished notebook that SIGINT
    can land in the idle kernel's last handler and put "KeyboardInterrupt caught in kernel" in the run log."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager

    sent = []

    async def record(self):
        sent.append(self.shutting_down)

    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", record)
    km = cli._ipc_kernel_manager(tmp_path)()
    assert km.transport == "ipc" and km.ip == str(tmp_path / "kernel")
    km.shutting_down = False
    asyncio.run(km._async_interrupt_kernel())  # an interrupt asked for (e.g. by a user) still goes through
    km.shutting_down = True
    asyncio.run(km._async_interrupt_kernel())
    assert sent == [False]


def test_a_dead_kernel_stops_the_run_named(tiny_notebooks, tmp_path, capsys):
    _notebook(tiny_notebooks / "01_dies.ipynb", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    rc = cli.main(["run", "--preset", "smoke", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "01_dies.ipynb stopped in cell 2 (import os, signal)" in err and "--resume" in err


def test_progress_lines_reach_the_console_and_the_log(tiny_notebooks, tmp_path, capsys):
    _notebook(tiny_notebooks / "01_loop.ipynb",
              "from kpnb.core import progress\nimport time\n"
              "b = progress.bar(total=3, desc='demo loop')\n"
              "for i in range(3):\n    b.set_postfix(loss=0.5 / (i + 1)); b.update(1); time.sleep(0.3)\nb.close()",
              FINISH.replace("NAME", '"01_loop"'))
    monkeypatch_env = {"KPNB_PROGRESS_EVERY": "0"}
    import os
    old = {k: os.environ.get(k) for k in monkeypatch_env}
    os.environ.update(monkeypatch_env)
    try:
        assert cli.main(["run", "--preset", "smoke", "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "demo loop" in line]
    assert any("step 2/3 (67%)" in line and "loss 0.25" in line and "left" in line for line in lines), out
    assert any(line.rstrip().endswith("done") for line in lines)
    assert "demo loop  step 3/3" in (tmp_path / "run" / "progress.log").read_text()
    assert "01_loop: done in" in out and "ok 1" not in out  # headline keys are known per notebook only


def test_every_preset_has_a_cell_timeout():
    assert set(settings.CELL_TIMEOUT_S) == set(settings.PRESETS)


@pytest.mark.parametrize("disable", [False, True])
def test_a_bar_iterated_counts_each_item_once(tmp_path, monkeypatch, disable):
    from kpnb.core import progress

    log = tmp_path / "progress.log"
    monkeypatch.setenv("KPNB_PROGRESS_LOG", str(log))
    monkeypatch.setenv("KPNB_PROGRESS_EVERY", "0")
    # mininterval 0: a shown tqdm calls update() from its own iterator at every item
    for i in progress.bar(range(5), desc="items", disable=disable, mininterval=0, miniters=1):
        if i == 4:
            break  # a loop left at its last item: that item is not counted
    text = log.read_text()
    assert "items  step 4/5 (80%)" in text and "step 5/5" not in text and "step 6/5" not in text, text


# ---- one writer per run folder ---------------------------------------------------------------------------
def stale_lock(path):
    """A lock file left by a writer that was killed: its PID is a finished process's."""
    pid = dead_pid()
    (path / lock.LOCK_NAME).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "command": "kpnb gone",
                                                   "started": "earlier", "started_unix": time.time() - 60}))
    return pid


@pytest.fixture
def no_inherited_holder(monkeypatch):
    monkeypatch.setenv(lock.HOLDER_ENV, "")  # restored after the test: a notebook opened here would set it


def test_a_second_run_or_train_of_a_held_folder_is_refused_before_any_work(tmp_path, capsys):
    run = tmp_path / "run"
    folder.run_dir(run, "smoke")
    config = (run / "config.json").read_text()
    with other_holder(run, "kpnb run --resume RUN --only 03") as p:
        holder = f"kpnb run --resume RUN --only 03 (PID {p.pid} on {socket.gethostname()}), since"
        t0 = time.time()
        r = _kpnb("run", "--resume", str(run), "--only", "02", "--no-progress", "-p", "vq.steps=7")
        took = time.time() - t0
        assert r.returncode == 2 and holder in r.stderr and "Wait for it to finish" in r.stderr, r.stderr
        assert took < 30, took  # the interpreter's start and the imports; nothing waits for the holder
        t0 = time.time()
        assert cli.main(["train", "vq", "--run-dir", str(run), "--no-progress", "-p", "vq.steps=7"]) == 2
        assert time.time() - t0 < 10
        assert holder in capsys.readouterr().err
    assert (run / "config.json").read_text() == config  # neither recorded its -p
    assert not any((run / "metrics").iterdir()) and not any((run / "notebooks").iterdir())
    assert not any((run / "checkpoints").iterdir())


def test_a_stale_lock_is_taken_over_and_the_run_goes_on_its_notebooks_under_its_lock(tiny_notebooks, tmp_path,
                                                                                       capsys):
    _notebook(tiny_notebooks / "02_ok.ipynb", "from kpnb.core import lock\nfrom kpnb.run import folder\n"
              "nb = folder.NotebookRun('02_ok', preset, run_dir, overrides)\n"
              "nb.finish({'inherited': lock.inherited(run_dir)})")
    run = tmp_path / "run"
    folder.run_dir(run, "smoke")
    pid = stale_lock(run)
    assert cli.main(["run", "--resume", str(run), "--only", "02", "--no-progress"]) == 0
    assert f"taking over the lock of {run} from kpnb gone (PID {pid}" in capsys.readouterr().err
    assert files.read_metrics(run, "02_ok")["inherited"] is True  # its kernel worked under kpnb run's lock
    assert not (run / lock.LOCK_NAME).exists()  # released at the end


def test_train_takes_over_a_stale_lock_and_trains(tmp_path, capsys):
    from kpnb.data import subset
    from kpnb.synth import renders

    run = tmp_path / "run"
    folder.run_dir(run, "smoke")
    images, poses = renders.render_truth(32, seed=5, image_size=32, render_size=64)
    subset.save_subset(run, "train", ids=[f"r{i}" for i in range(32)], images=images, poses=poses,
                       captions=[""] * 32, attrs=[{}] * 32)
    pid = stale_lock(run)
    assert cli.main(["train", "vq", "--run-dir", str(run), "--spec", "f4", "--no-progress"]) == 0
    assert f"from kpnb gone (PID {pid}" in capsys.readouterr().err
    assert folder.RunFiles(run).has(run / "checkpoints" / "vq-f4") and not (run / lock.LOCK_NAME).exists()


def test_data_filter_refuses_a_held_result_folder(tmp_path, capsys):
    from kpnb.run import filter as run_filter

    out = tmp_path / "filtered"
    with other_holder(out, "kpnb data filter shards --out filtered") as p:
        assert run_filter.main([str(tmp_path / "no-shards"), "--out", str(out), "--no-clip", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"kpnb data filter shards --out filtered (PID {p.pid}" in err and "no-shards" not in err  # refused first


NOTEBOOK = "import sys\nfrom kpnb.run import folder\nnb = folder.NotebookRun('02_x', 'smoke', sys.argv[1])\n"


def _python(code, *args, env=None):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def test_a_notebook_under_a_holder_is_let_in_and_one_beside_a_live_holder_refused(tmp_path, no_inherited_holder):
    run = tmp_path / "run"
    with lock.holding(run, "kpnb run (this test)"):  # this process plays kpnb run; a child, its notebook's kernel
        r = _python(NOTEBOOK + "nb.finish({'ok': 1})", run)
        assert r.returncode == 0, r.stderr
        assert files.read_metrics(run, "02_x")["ok"] == 1
    other = tmp_path / "other"
    # a kernel opened by hand beside another one on the same folder
    with other_holder(other, "notebook 03_vq_training") as p, \
            pytest.raises(lock.FolderLocked, match=f"notebook 03_vq_training \\(PID {p.pid} on "):
        folder.NotebookRun("02_x", "smoke", str(other))
    assert not (other / "config.json").exists()  # refused before anything was written


def test_a_notebook_keeps_the_lock_until_it_finishes_and_a_killed_ones_is_taken_over(tmp_path, capsys,
                                                                                         no_inherited_holder):
    run = tmp_path / "run"
    r = _python(NOTEBOOK + "import json, os\nprint(json.load(open(os.path.join(sys.argv[1], '.kpnb-lock.json'))))",
                run)
    assert r.returncode == 0 and "'command': 'notebook 02_x'" in r.stdout, r.stderr
    assert not (run / lock.LOCK_NAME).exists()  # released as the interpreter exited
    r = _python(NOTEBOOK + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", run)  # a kernel that died
    assert r.returncode != 0 and (run / lock.LOCK_NAME).exists()
    nb = folder.NotebookRun("02_y", "smoke", str(run))
    assert "from notebook 02_x (PID" in capsys.readouterr().err
    assert json.loads((run / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    nb.finish({"ok": 1})
    assert not (run / lock.LOCK_NAME).exists()  # a finished notebook lets the next one in


# ---- a damaged checkpoint falls back --------------------------------------------------------------------------
def _run_with_subset(run):
    from kpnb.data import subset
    from kpnb.synth import renders

    folder.run_dir(run, "smoke")
    images, poses = renders.render_truth(32, seed=5, image_size=32, render_size=64)
    subset.save_subset(run, "train", ids=[f"r{i}" for i in range(32)], images=images, poses=poses,
                       captions=[""] * 32, attrs=[{}] * 32)
    return run


def test_kpnb_train_finishes_past_a_truncated_newest_checkpoint_with_the_undamaged_weights(tmp_path, capsys):
    run = _run_with_subset(tmp_path / "run")
    train = ["train", "vq", "--run-dir", str(run), "--spec", "f4", "--no-progress", "-p", "vq.ckpt_every=2"]
    assert cli.main(train + ["-p", "runtime.keep_checkpoints=3"]) == 0
    ckpt = run / "checkpoints" / "vq-f4"
    assert sorted(p.name for p in ckpt.glob("ckpt-*.json")) == [f"ckpt-000000{s}.json" for s in (2, 4, 6)]
    newest = ckpt / "ckpt-0000006.safetensors"
    undamaged = {k: v.clone() for k, v in files.load_tensors(newest)[0].items()}  # not a view of the mapped file
    with open(newest, "r+b") as f:
        f.truncate(2000)  # a copy cut short
    capsys.readouterr()
    assert cli.main(train) == 0  # the recorded keep_checkpoints=3 holds: -p values go to config.json
    out = capsys.readouterr().out
    assert f"damaged checkpoint {newest}" in out and "ckpt-0000004.json" in out, out
    redone, _ = files.load_tensors(newest)
    assert redone.keys() == undamaged.keys() and all(torch.equal(redone[k], undamaged[k]) for k in undamaged)
