"""The ``kpnb`` command: ``kpnb run`` (notebooks headless with papermill), ``kpnb train`` (one training stage
of a run, also under ``torchrun``), ``kpnb sample`` (images for pose files), ``kpnb synth``, ``kpnb data pack``
(a candidate pool as resumable WebDataset shards, :mod:`kpnb.data.shards`), ``kpnb data filter`` (notebook 01's
filter over those shards, :mod:`kpnb.data.stream_filter`), ``kpnb bench``, ``kpnb status`` (the
README's status table from a run folder's metrics; ``--times``: where its time went, :mod:`kpnb.run.timing`).

``kpnb run [--preset P] [--out DIR | --resume DIR [--rerun]] [--only 01,02] [-p name=value ...]``

* ``-p section.key=value`` overrides a preset setting (``-p vq.steps=200``), at any depth
  (``-p vq.models.f4.n_codes=512``); a dict value merges into the settings there key by key
  (``-p 'vq.models={"f4":{"n_codes":512}}'`` keeps f8, f16 and f4's other keys). ``-p name=value`` sets a
  notebook parameter (``-p dataset_dir=/data/danbooru``). Values are JSON when they parse, else strings.
  Unknown presets, settings (at any depth) and parameters, and values of the wrong type (``-p vq.steps=true``),
  are refused before any work, naming the setting and listing the valid ones.
* Notebooks run in order into ``DIR/notebooks/``; the first failure stops the run and prints the failing
  cell's error. ``--resume DIR`` skips notebooks that already finished (their metrics file exists), unless
  ``--rerun`` asks for them again.
* While a notebook runs, its progress lines (:mod:`kpnb.core.progress`: model, step/total, losses, images/s, time
  left) are printed, and kept in ``DIR/progress.log``, where a line marks each notebook's start; after each
  notebook its wall time and headline metrics, at the end a table of all. ``--timeout S`` limits each cell
  (default :data:`kpnb.core.settings.CELL_TIMEOUT_S` per preset); a cell past it, or a dead kernel, stops the
  run naming the notebook and cell, with everything written so far kept for ``--resume``.
* A run folder has one writer (:mod:`kpnb.core.lock`): ``kpnb run`` holds its lock while it runs, and a second
  ``kpnb run`` or ``kpnb train`` of the same folder is refused before any work, naming the holder. The notebooks
  it runs work under its lock (their kernels inherit :data:`kpnb.core.lock.HOLDER_ENV`).

``kpnb train STAGE --run-dir DIR [--spec S] [--mode M] [--further] [-p section.key=value ...]`` trains one
stage (:mod:`kpnb.run.stages`) into the run folder's checkpoints, where the notebooks find it. ``-p`` values
(checked as ``kpnb run``'s) are recorded in the run's ``config.json``, so the notebooks train with the same
settings. Under ``torchrun --nproc_per_node N -m kpnb train STAGE --run-dir DIR`` every process joins one DDP
group (NCCL on GPUs, gloo on CPUs); rank 0 holds the run folder's lock, so a ``kpnb train`` beside a ``kpnb run``
of the same folder is refused. The option is ``--run-dir``, not ``--run``: torchrun's parser would take ``--run``
for its own ``--run-path``.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kpnb.core import files, lock, settings
from kpnb.core import progress as kprogress
from kpnb.run import folder

COMMON_PARAMETERS = ("preset", "run_dir", "overrides")
P_HELP = ("a preset setting, section.key=value at any depth (-p vq.models.f4.n_codes=512), the value JSON when "
          "it parses; a dict value merges into the settings there key by key; an unknown key or a value of the "
          "wrong type is refused")


def notebooks_dir() -> Path:
    return files.repo_root() / "notebooks"


def list_notebooks() -> list[Path]:
    """The numbered notebooks in run order: ``05_sampling`` before ``05b_released_model`` before ``06_...``."""
    return sorted(p for p in notebooks_dir().glob("*.ipynb") if re.fullmatch(r"\d\d[a-z]?_.+", p.stem))


def notebook_key(nb: Path | str) -> str:
    """What ``--only`` and the per-notebook tables call a notebook: its number, ``05`` or ``05b``."""
    return Path(nb).stem.partition("_")[0]


def notebook_parameters(nb: Path) -> dict[str, Any]:
    """Names and default values of the cell tagged ``parameters`` (read without a kernel)."""
    data = json.loads(nb.read_text())
    for cell in data["cells"]:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            src = "".join(cell["source"])
            out: dict[str, Any] = {}
            for node in ast.parse(src).body:
                if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
                    try:
                        out[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        out[node.targets[0].id] = None
            return out
    raise settings.ConfigError(f"{nb}: no cell tagged 'parameters'")


def _select(only: str | None) -> list[Path]:
    nbs = list_notebooks()
    if not only:
        return nbs
    wanted = [w.strip() for w in only.split(",") if w.strip()]
    chosen = [nb for nb in nbs if notebook_key(nb) in wanted or nb.stem in wanted]
    unknown = [w for w in wanted if not any(notebook_key(nb) == w or nb.stem == w for nb in nbs)]
    if unknown:
        raise settings.ConfigError(f"unknown notebook(s) {', '.join(unknown)}; valid: "
                               f"{', '.join(notebook_key(nb) for nb in nbs)}")
    return chosen


def split_params(pairs: list[str], preset: str, nbs: list[Path]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``name=value`` pairs -> (preset overrides, notebook parameters); refuses unknown names."""
    overrides: dict[str, Any] = {}
    nb_params: dict[str, Any] = {}
    known = set()
    for nb in nbs:
        known |= set(notebook_parameters(nb))
    known -= set(COMMON_PARAMETERS)
    for pair in pairs:
        name, eq, value = pair.partition("=")
        if not eq:
            raise settings.ConfigError(f"parameter {pair!r} must look like name=value")
        if "." in name:
            overrides[name] = settings.parse_value(value)
        elif name in known:
            nb_params[name] = settings.parse_value(value)
        else:
            raise settings.ConfigError(f"unknown parameter {name!r}; notebook parameters: {', '.join(sorted(known))}; "
                                   f"preset settings look like section.key (see kpnb.core.settings.PRESETS)")
    settings.preset_config(preset, overrides)  # validates every override
    return overrides, nb_params


# the preset sections each notebook reads (runtime aside: all read it); tests/run/test_notebooks.py checks this
# against the settings the smoke run's notebooks actually read
SECTION_READERS = {
    "01": ("data", "filter", "clip"), "02": ("data",), "03": ("vq", "quality", "clip", "data"),
    "04": ("diffusion", "estimator", "data", "quality", "clip"), "05": ("diffusion", "quality", "clip", "data"),
    "05b": (), "06": ("clip", "vq", "estimator", "data", "quality"),
    "07": ("transformer", "quality", "clip", "data"),
    "08": ("diffusion", "transformer", "vq"),
}

# the numbers printed after each notebook and in the closing table (the full set is in metrics/<stem>.json)
HEADLINES = {
    "01": ("n_kept", "precision", "recall"),
    "02": ("n_poses",),
    "03": ("f4.psnr", "f8.psnr", "f16.psnr"),
    "04": ("best_mode", "estimator.ceiling.pck@0.1", "diffusion_train_seconds_total"),
    "05": ("best_mode", "best.pck@0.1"),
    "05b": ("original.checkpoint",),
    "06": ("zero_shot.hair_colour", "best_spec"),
    "07": ("pck@0.1", "val_loss"),
    "08": ("n_figures",),
}


def headline(root: Path, stem: str) -> str:
    """``key value`` pairs of a finished notebook's main metrics."""
    try:
        m = files.read_metrics(root, stem)
    except (OSError, ValueError):
        return ""
    if notebook_key(stem) == "05" and m.get("best_mode"):
        m = {**m, "best.pck@0.1": m.get(f"{m['best_mode']}.pck@0.1")}
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "  ".join(f"{k} {fmt(m[k])}" for k in HEADLINES.get(notebook_key(stem), ()) if m.get(k) is not None)


class _Tail(threading.Thread):
    """Prints the lines appended to a file (the notebooks' progress log) while a notebook runs."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.stop, self.pos = path, threading.Event(), path.stat().st_size if path.exists() else 0

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.flush()

    def flush(self) -> None:
        if not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self.pos)
            text = f.read()
        done = text.rfind("\n") + 1  # whole lines only
        if done:
            self.pos += len(text[:done].encode())
            for line in text[:done].splitlines():
                print(f"      {line}", flush=True)


def _stopped_cell(out_nb: Path) -> str:
    """Which cell of an executed notebook was running when it stopped, numbered as in that notebook: the one
    with an error output (a time-out) or papermill's "failed" mark, else the last cell that started (a kernel
    that died leaves no error behind)."""
    try:
        cells = json.loads(out_nb.read_text())["cells"]
    except (OSError, ValueError):
        return "unknown"
    started = [i for i, c in enumerate(cells) if c.get("metadata", {}).get("papermill", {}).get("start_time")]
    failed = [i for i, c in enumerate(cells) if c.get("metadata", {}).get("papermill", {}).get("status") == "failed"
              or any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    if not (failed or started):
        return "unknown"
    i = (failed or started)[0 if failed else -1]
    src = "".join(cells[i].get("source", "")).strip().splitlines()
    return f"{i} ({src[0][:60] if src else 'empty'})"


def _ipc_kernel_manager(sock_dir: Path) -> type:
    """A kernel manager whose kernel talks over local IPC sockets in ``folder`` (private: mode 0700) instead of
    TCP ports on localhost (jupyter_client warns that TCP is unencrypted; these sockets are reachable by this
    user alone)."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IPCKernelManager(AsyncKernelManager):
        @default("transport")
        def _default_transport(self) -> str:
            return "ipc"

        @default("ip")
        def _default_ip(self) -> str:
            return str(sock_dir / "kernel")

        async def _async_interrupt_kernel(self) -> None:
            # jupyter_client interrupts the kernel before every shutdown. After a finished notebook the kernel
            # is idle and the SIGINT can land in its last message handler, which logs "KeyboardInterrupt caught
            # in kernel" as an ERROR in the run's log; a busy kernel (a time-out) is killed by the shutdown anyway
            if not self.shutting_down:
                await super()._async_interrupt_kernel()

    return IPCKernelManager


def cmd_run(args: argparse.Namespace, command: str = "kpnb run") -> int:
    """``kpnb run``: the settings checked, then the run folder's lock taken (refused, naming the holder, when
    another writer has it) before its config.json is written or any notebook runs."""
    try:
        root, preset, nbs, overrides, changed, nb_params = _plan_run(args)
    except settings.ConfigError as e:
        print(f"kpnb run: {e}", file=sys.stderr)
        return 2
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(lock.holding(root, command))
            folder.run_dir(root, preset, overrides)
            nb_params = _record(root, preset, overrides, changed, nb_params, nbs, args)
        except (settings.ConfigError, lock.FolderLocked) as e:
            print(f"kpnb run: {e}", file=sys.stderr)
            return 2
        return _run_notebooks(args, root, preset, nbs, overrides, nb_params)


def _run_notebooks(args: argparse.Namespace, root: Path, preset: str, nbs: list[Path], overrides: dict[str, Any],
                   nb_params: dict[str, Any]) -> int:
    timeout = args.timeout if args.timeout is not None else settings.CELL_TIMEOUT_S.get(preset)
    timeout = timeout or None  # 0: no limit
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    progress_log = root / "progress.log"
    os.environ[kprogress.LOG_ENV] = str(progress_log.resolve())
    print(f"kpnb run: preset {preset}, run folder {root}; progress lines also in {progress_log}"
          + (f"; cell time-out {timeout:.0f} s" if timeout else ""))
    done_rows: list[tuple[str, str, str]] = []
    for nb in nbs:
        if args.resume and (root / "metrics" / f"{nb.stem}.json").exists() and not args.rerun:
            print(f"  {nb.stem}: finished before, skipped")
            done_rows.append((nb.stem, "skipped", headline(root, nb.stem)))
            continue
        accepted = notebook_parameters(nb)
        params = {"preset": preset, "run_dir": str(root.resolve()), "overrides": overrides}
        params.update({k: v for k, v in nb_params.items() if k in accepted})
        out_nb = root / "notebooks" / nb.name
        t0 = time.time()
        print(f"  {nb.stem}: running ...", flush=True)
        kprogress.mark_notebook(nb.stem)
        if not _execute(nb, out_nb, params, timeout, progress_log, args.progress):
            return _stopped(root, out_nb)
        secs = time.time() - t0
        done_rows.append((nb.stem, f"{secs:.0f} s", headline(root, nb.stem)))
        print(f"  {nb.stem}: done in {secs:.0f} s  {done_rows[-1][2]}", flush=True)
    print(f"kpnb run: finished; metrics in {root / 'metrics'}, figures in {root / 'figures'}")
    width = max(len(r[0]) for r in done_rows) if done_rows else 10
    for stem, secs, head in done_rows:
        print(f"  {stem:{width}}  {secs:>8}  {head}")
    return 0


def _plan_run(args: argparse.Namespace) -> tuple[Path, str, list[Path], dict[str, Any], dict[str, Any],
                                                 dict[str, Any]]:
    """(run folder, preset, notebooks, overrides, overrides changed now, notebook parameters) of a new or
    resumed run, nothing written yet. An unknown notebook, parameter or setting, and a resume of a folder that
    is no run, raise ConfigError."""
    if args.resume:
        root = Path(args.resume)
        if not (root / "config.json").exists():
            raise settings.ConfigError(f"{root} is not a run folder (no config.json)")
        cfg = json.loads((root / "config.json").read_text())
        preset, saved_overrides = cfg["preset"], cfg.get("overrides", {})
    else:
        preset, saved_overrides = args.preset, {}
        root = Path(args.out) if args.out else folder.default_run_dir(preset)
    nbs = _select(args.only)
    overrides, nb_params = split_params(args.param or [], preset, nbs)
    changed = {k: v for k, v in overrides.items() if saved_overrides.get(k, object()) != v}
    overrides = {**saved_overrides, **overrides}
    settings.preset_config(preset, overrides)  # the recorded ones with the new ones, before the folder is made
    return root, preset, nbs, overrides, changed, nb_params


def _record(root: Path, preset: str, overrides: dict[str, Any], changed: dict[str, Any], nb_params: dict[str, Any],
            nbs: list[Path], args: argparse.Namespace) -> dict[str, Any]:
    """Keep new overrides and notebook parameters in config.json, so that a later --resume passes them again;
    on a resume, name the finished notebooks they would change. Returns the run's notebook parameters."""
    cfg = json.loads((root / "config.json").read_text())
    saved_params = cfg.get("params", {})
    new_params = {k: v for k, v in nb_params.items() if saved_params.get(k, object()) != v}
    nb_params = {**saved_params, **nb_params}
    if (args.resume and changed) or new_params:
        files.write_json(root / "config.json", {**cfg, "overrides": overrides, "params": nb_params,
                                               "settings": settings.preset_config(preset, overrides)})
    if args.resume and (changed or new_params):  # name what they would change among the finished notebooks
        finished = [nb.stem for nb in list_notebooks() if (root / "metrics" / f"{nb.stem}.json").exists()
                    and (any(k.split(".")[0] in SECTION_READERS.get(notebook_key(nb), ()) for k in changed)
                         or set(new_params) & set(notebook_parameters(nb)))]
        rerun = [s for s in finished if args.rerun and any(s == nb.stem for nb in nbs)]
        stale = [s for s in finished if s not in rerun]
        print(f"kpnb run: recorded {', '.join(f'{k}={v!r}' for k, v in {**changed, **new_params}.items())} in "
              f"{root / 'config.json'}"
              + (f"; finished notebooks that read these and would change if rerun: {', '.join(stale)} "
                 f"(rerun them with --rerun --only ...)" if stale else ""))
    return nb_params


def _execute(nb: Path, out_nb: Path, params: dict[str, Any], timeout: float | None, progress_log: Path,
             progress_bar: bool) -> bool:
    """Run one notebook with papermill into ``out_nb``, its progress lines printed as they come; False (the
    cause printed) when a cell failed, ran past ``timeout`` or the kernel died."""
    import papermill as pm

    tail = _Tail(progress_log)
    tail.start()
    sockets = Path(tempfile.mkdtemp(prefix="kpnb-kernel-"))
    try:
        pm.execute_notebook(str(nb), str(out_nb), parameters=params, cwd=str(notebooks_dir()),
                            progress_bar=progress_bar, kernel_name="python3", execution_timeout=timeout,
                            kernel_manager_class=_ipc_kernel_manager(sockets))
    except pm.PapermillExecutionError as e:
        print(f"kpnb run: {nb.name} failed in cell {e.exec_count}: {e.ename}: {e.evalue}", file=sys.stderr)
        print("".join(_strip_ansi(line) + "\n" for line in e.traceback[-12:]), file=sys.stderr)
        return False
    except Exception as e:  # noqa: BLE001 - a time-out or a dead kernel: name where, keep everything
        kind = "timed out" if "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower() else "stopped"
        print(f"kpnb run: {nb.name} {kind} in cell {_stopped_cell(out_nb)}: {type(e).__name__}: "
              f"{str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}", file=sys.stderr)
        return False
    finally:
        tail.stop.set()
        tail.join()
        tail.flush()
        shutil.rmtree(sockets, ignore_errors=True)
    return True


def _stopped(root: Path, out_nb: Path) -> int:
    print(f"kpnb run: the executed notebook is {out_nb}; finished notebooks and checkpoints are kept - "
          f"`kpnb run --resume {root}` goes on from here", file=sys.stderr)
    return 1


def _strip_ansi(s: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", s)


# synth, bench and status import torch and the models: deferred so that `kpnb run --help` answers at once
def cmd_synth(argv: list[str]) -> int:
    from kpnb import synth

    return synth.main(argv) or 0


def cmd_sample(argv: list[str]) -> int:
    from kpnb.run import sample

    return sample.main(argv) or 0


def cmd_data(argv: list[str]) -> int:
    if argv and argv[0] == "filter":
        from kpnb.run import filter as run_filter

        return run_filter.main(argv[1:]) or 0
    from kpnb.data import shards

    return shards.main(argv) or 0


def cmd_bench(argv: list[str]) -> int:
    from kpnb.run import bench

    return bench.main(argv) or 0


def cmd_train(args: argparse.Namespace, command: str = "kpnb train") -> int:
    root = Path(args.run_dir)
    if not (root / "config.json").exists():
        print(f"kpnb train: {root} is not a run folder (no config.json); start one with kpnb run --out {root} "
              f"--only 01", file=sys.stderr)
        return 2
    saved = json.loads((root / "config.json").read_text())
    try:
        extra = {}
        for pair in args.param or []:
            name, eq, value = pair.partition("=")
            if not eq or "." not in name:
                raise settings.ConfigError(f"parameter {pair!r} must look like section.key=value")
            extra[name] = settings.parse_value(value)
        overrides = {**saved.get("overrides", {}), **extra}
        cfg = settings.preset_config(saved["preset"], overrides)
    except settings.ConfigError as e:
        print(f"kpnb train: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from kpnb.core import runtime

    with contextlib.ExitStack() as stack:
        if runtime.dist_env()[0] == 0:  # rank 0 writes the run folder's files; the other ranks work under it
            try:
                stack.enter_context(lock.holding(root, command))
            except lock.FolderLocked as e:
                print(f"kpnb train: {e}", file=sys.stderr)
                return 2
        return _train(args, root, saved, extra, overrides, cfg)


def _train(args: argparse.Namespace, root: Path, saved: dict[str, Any], extra: dict[str, Any],
           overrides: dict[str, Any], cfg: dict[str, Any]) -> int:
    """``kpnb train`` once its settings are checked and the run folder's lock is held."""
    from kpnb.core import runtime
    from kpnb.run import stages

    rt = runtime.use(runtime.Runtime.from_settings(cfg["runtime"]))
    if extra and rt.is_main:  # the notebooks read config.json: they must train with these settings too
        files.write_json(root / "config.json", {**saved, "overrides": overrides, "settings": cfg})
    if rt.is_main:
        print(f"kpnb train {args.stage}: run {root}, preset {saved['preset']}, {rt.describe()}", flush=True)
    try:
        summary = stages.run_stage(args.stage, root, cfg, spec=args.spec, mode=args.mode, further=args.further,
                                   progress=args.progress and rt.is_main, runtime=rt)
    finally:
        if rt.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rt.is_main:
        print(json.dumps(summary, indent=2, default=str))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from kpnb.run import status, timing

    if not (Path(args.run) / "metrics").is_dir():
        print(f"kpnb status: {args.run} is not a run folder (no metrics/)", file=sys.stderr)
        return 2
    if args.times:
        print(timing.time_table(args.run), end="")
    elif args.readme:
        status.update_readme(args.readme, args.run)
        print(f"kpnb status: {args.readme} updated from {args.run}")
    else:
        print(status.status_table(args.run), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "synth":
        return cmd_synth(argv[1:])
    if argv and argv[0] == "bench":
        return cmd_bench(argv[1:])
    if argv and argv[0] == "sample":
        return cmd_sample(argv[1:])
    if argv and argv[0] == "data":
        return cmd_data(argv[1:])
    p = argparse.ArgumentParser(prog="kpnb", description="kpnb workbook: run | train | sample | synth | data | bench | status")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute the notebooks headless with papermill")
    r.add_argument("--preset", default="cpu", help=f"one of {', '.join(settings.PRESETS)}")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--out", help="run folder (default outputs/<timestamp>_<preset>)")
    g.add_argument("--resume", help="go on with an interrupted run folder")
    r.add_argument("--only", help="comma-separated notebook numbers, e.g. 01,02 (05b: the released checkpoint)")
    r.add_argument("--rerun", action="store_true", help="with --resume: run the selected notebooks again even if "
                                                        "they finished (e.g. --only 05 with a new parameter)")
    r.add_argument("-p", "--param", action="append", metavar="NAME=VALUE", help=P_HELP + "; or a notebook "
                   "parameter, name=value (-p dataset_dir=/data/danbooru)")
    r.add_argument("--no-progress", dest="progress", action="store_false")
    r.add_argument("--timeout", type=float, help="seconds one cell may run (default per preset: "
                   f"{', '.join(f'{k} {v}' for k, v in settings.CELL_TIMEOUT_S.items())}; 0 = no limit)")
    t = sub.add_parser("train", help="train one stage of a run (also under torchrun)", allow_abbrev=False)
    t.add_argument("stage", choices=("vq", "estimator", "ldm", "transformer", "clip"))
    # not --run: torchrun's own parser takes "--run" for an abbreviation of its --run-path
    t.add_argument("--run-dir", required=True, help="run folder (made by kpnb run)")
    t.add_argument("--spec", help="vq: one spec (default: all of vq.specs); ldm: latents (default f4); "
                                  "transformer: codes (default transformer.spec)")
    t.add_argument("--mode", help="ldm: conditioning mode (default: the run's best mode, else the first)")
    t.add_argument("--further", action="store_true", help="ldm: the best mode's longer run (diffusion.best_steps)")
    t.add_argument("-p", "--param", action="append", metavar="SECTION.KEY=VALUE", help=P_HELP)
    t.add_argument("--no-progress", dest="progress", action="store_false")
    sub.add_parser("sample", help="images for pose files from a run or the released model (kpnb sample --help)")
    sub.add_parser("synth", help="write the synthetic dataset (kpnb synth --help)")
    sub.add_parser("data", help="pack a candidate pool (kpnb's or Danbooru2021's layout) into resumable WebDataset "
                                "shards (kpnb data pack --help), filter them (kpnb data filter --help)")
    sub.add_parser("bench", help="measure training/sampling speed (kpnb bench --help)")
    st = sub.add_parser("status", help="the README's status table from a run folder's metrics")
    st.add_argument("run", help="run folder")
    what = st.add_mutually_exclusive_group()
    what.add_argument("--readme", help="replace the status block of this README instead of printing")
    what.add_argument("--times", action="store_true", help="print where the run's time went instead: each "
                      "notebook's seconds, its progress bars' and the rest")
    args = p.parse_args(argv)
    command = shlex.join(["kpnb", *argv])  # how a lock names its holder
    if args.cmd == "status":
        return cmd_status(args)
    if args.cmd == "train":
        return cmd_train(args, command)
    if args.cmd == "run":
        if args.preset not in settings.PRESETS:
            print(f"kpnb run: unknown preset {args.preset!r}; valid presets: {', '.join(settings.PRESETS)}",
                  file=sys.stderr)
            return 2
        return cmd_run(args, command)
    return 2


if __name__ == "__main__":
    sys.exit(main())
