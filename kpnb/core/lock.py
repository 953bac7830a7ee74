"""One writer per folder: a lock file that names its holder.

Two commands writing one run folder at once (two ``kpnb run --resume`` of the same run, a ``kpnb train`` beside a
notebook) would train the same models into the same checkpoint folders. A writer holds the folder's lock while
it works::

    with lock.holding(run, command="kpnb run ..."):    # FolderLocked, naming the holder, if another one has it
        ...

The lock is a file in the folder (:data:`LOCK_NAME`) holding the host, PID, command line and start time,
created with ``O_CREAT | O_EXCL`` (so of two writers exactly one makes it), then written and fsynced. A second
writer is refused. A lock whose process is gone (same host, no such PID) is taken over with a message naming
the old holder; a lock from another host is never taken over, since its PID cannot be checked from here. A lock
file that is empty or unreadable is a writer stopped between making and writing it, or one writing it right
now: it is read again after :data:`GRACE_S` and taken over only if it is still the same empty file.

A holder's child processes (the kernels ``kpnb run`` starts, a ``kpnb train`` run from such a kernel) work for
it: while a lock is held, :data:`HOLDER_ENV` names it (``<lock path>:<pid>``), and a process whose ancestor
holds the folder's lock takes none itself (:func:`inherited`). A notebook run by hand holds the lock for the
kernel's life (:func:`hold_until_exit`): a second kernel on the same folder is refused until the first is shut
down, and a kernel that died leaves a stale lock the next one takes over.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

LOCK_NAME = ".kpnb-lock.json"
HOLDER_ENV = "KPNB_LOCK_HOLDER"  # "<lock path>:<pid>" of the lock an ancestor process holds
GRACE_S = 0.5                    # how long an empty lock file may be a writer still writing it

_HELD: dict[Path, int] = {}      # lock files this process holds -> how many holders in it share each


class FolderLocked(RuntimeError):
    """Another writer holds the folder's lock; the message names it and says what to do."""


def lock_path(folder: str | Path) -> Path:
    return Path(folder).resolve() / LOCK_NAME


def read_holder(path: str | Path) -> dict[str, Any] | None:
    """The record in a lock file; None when the file is missing, empty or not a holder's JSON."""
    try:
        rec = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and isinstance(rec.get("pid"), int) and rec.get("host") else None


def describe(rec: dict[str, Any]) -> str:
    """``<command> (PID <pid> on <host>), since <start> (<age> ago)``."""
    since = rec.get("started_unix")
    age = max(0.0, time.time() - since) if isinstance(since, (int, float)) else 0.0
    ago = f"{age:.0f} s" if age < 120 else f"{age / 60:.0f} min" if age < 7200 else f"{age / 3600:.1f} h"
    return (f"{rec.get('command') or 'unknown command'} (PID {rec['pid']} on {rec['host']}), since "
            f"{rec.get('started', '?')} ({ago} ago)")


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the process name (Linux): state, parent PID, ...; None without."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()  # the name in parentheses may hold spaces


def _alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host (one of another user's counts as running; a zombie,
    finished but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    return not (stat and stat[0] == "Z")


def _parent(pid: int) -> int | None:
    """The parent PID from /proc (Linux); None where there is no /proc entry."""
    stat = _proc_stat(pid)
    return int(stat[1]) if stat else None


def _self_or_ancestor(pid: int) -> bool:
    if pid in (os.getpid(), os.getppid()):
        return True
    if not Path("/proc/self/stat").exists():  # no process tree to walk: the lock file naming ``pid`` must do
        return True
    p: int | None = os.getppid()
    while p and p > 1:
        p = _parent(p)
        if p == pid:
            return True
    return False


def inherited(folder: str | Path) -> bool:
    """Whether this process works for an ancestor that holds ``folder``'s lock: :data:`HOLDER_ENV` names this
    folder's lock file, that file names the same PID on this host, and that PID is this process or one of its
    ancestors (a leftover variable of a finished holder, or one copied into an unrelated process, counts not)."""
    value = os.environ.get(HOLDER_ENV, "")
    path, _, pid = value.rpartition(":")
    if not path or not pid.isdigit() or Path(path) != lock_path(folder):
        return False
    rec = read_holder(path)
    return (rec is not None and rec["pid"] == int(pid) and rec["host"] == socket.gethostname()
            and _self_or_ancestor(int(pid)))


class FolderLock:
    """The lock of one folder, for one holder in this process. :meth:`acquire` makes the folder if needed;
    holders in one process share the lock file (the last :meth:`release` removes it)."""

    def __init__(self, folder: str | Path, command: str | None = None):
        self.folder = Path(folder)
        self.path = lock_path(folder)
        self.command = command or " ".join([Path(sys.executable).name, *sys.argv])
        self.held = False

    def env_value(self) -> str:
        """What :data:`HOLDER_ENV` says to this holder's child processes."""
        return f"{self.path}:{os.getpid()}"

    def acquire(self) -> FolderLock:
        """Take the lock, taking over a stale one; FolderLocked (naming the holder) when another writer has it."""
        if self.held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path
        if path in _HELD and self._ours(read_holder(path)):
            _HELD[path] += 1
            self.held = True
            return self
        for _ in range(20):  # each pass either makes the file or removes a stale one; racing writers retry
            if self._create(path):
                _HELD[path] = 1
                self.held = True
                return self
            self._take_over_if_stale(path)
        raise FolderLocked(f"{self.folder}: could not take the lock {path} (other writers keep replacing it)")

    def release(self) -> None:
        """Let go; the file is removed when this was its last holder here and it still names this process."""
        if not self.held:
            return
        self.held = False
        path = self.path
        left = _HELD.pop(path, 1) - 1
        if left > 0:
            _HELD[path] = left
            return
        if self._ours(read_holder(path)):
            path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- internals --------------------------------------------------------------------------------------
    @staticmethod
    def _ours(rec: dict[str, Any] | None) -> bool:
        return rec is not None and rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()

    def _create(self, path: Path) -> bool:
        """Make the lock file with this process's record; False when one exists."""
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        rec = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "started_unix": time.time()}
        try:
            os.write(fd, (json.dumps(rec, indent=1) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _take_over_if_stale(self, path: Path) -> None:
        """Remove the lock file when its holder is gone (or it stayed empty past the grace period); raise
        FolderLocked naming a live holder or one on another host."""
        try:
            ino, rec = path.stat().st_ino, read_holder(path)
        except FileNotFoundError:
            return  # released meanwhile: try again
        if rec is None:
            time.sleep(GRACE_S)  # a writer may be between making the file and writing it
            try:
                again, rec = path.stat().st_ino, read_holder(path)
            except FileNotFoundError:
                return
            if again != ino:
                return  # replaced meanwhile: look at the new one
            if rec is None:
                print(f"kpnb: taking over the lock of {self.folder}: {path} is still empty or unreadable after "
                      f"{GRACE_S} s (a writer stopped while making it)", file=sys.stderr, flush=True)
                self._remove_if_same(path, ino)
                return
        if rec["host"] != socket.gethostname():
            raise FolderLocked(
                f"{self.folder} is in use by {describe(rec)}. That is another machine, where this one cannot "
                f"check whether it still runs: wait for it to finish there, or if that machine no longer runs it, "
                f"delete {path} and run this again.")
        if rec["pid"] == os.getpid() or not _alive(rec["pid"]):  # our own PID: a dead holder's, reused
            print(f"kpnb: taking over the lock of {self.folder} from {describe(rec)}: that process is no longer "
                  f"running", file=sys.stderr, flush=True)
            self._remove_if_same(path, ino)
            return
        raise FolderLocked(
            f"{self.folder} is in use by {describe(rec)}; two writers would train the same checkpoints over each "
            f"other. Wait for it to finish, or stop it (kill {rec['pid']}; a notebook: shut its kernel down), "
            f"then run this again.")

    @staticmethod
    def _remove_if_same(path: Path, ino: int) -> None:
        """Remove ``path`` only if it is still the file judged stale: moved aside first (one rename wins among
        racing writers), and put back when the file moved turns out to be a new holder's."""
        aside = path.with_name(f"{path.name}.stale-{os.getpid()}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        if aside.stat().st_ino != ino:  # a writer made a new lock since: it stays theirs
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)


@contextmanager
def holding(folder: str | Path, command: str | None = None) -> Iterator[FolderLock | None]:
    """Hold ``folder``'s lock for the block (None when an ancestor holds it: :func:`inherited`), with
    :data:`HOLDER_ENV` naming it to the child processes started meanwhile."""
    if inherited(folder):
        yield None
        return
    lk = FolderLock(folder, command).acquire()
    before = os.environ.get(HOLDER_ENV)
    os.environ[HOLDER_ENV] = lk.env_value()
    try:
        yield lk
    finally:
        if before is None:
            os.environ.pop(HOLDER_ENV, None)
        else:
            os.environ[HOLDER_ENV] = before
        lk.release()


def hold_until_exit(folder: str | Path, command: str | None = None) -> FolderLock | None:
    """Hold ``folder``'s lock until the interpreter exits (a notebook's kernel), unless an ancestor holds it;
    :data:`HOLDER_ENV` names it to child processes from then on. None when inherited."""
    if inherited(folder):
        return None
    lk = FolderLock(folder, command).acquire()  # a notebook's first cell run again: one more holder here
    atexit.register(lk.release)
    os.environ[HOLDER_ENV] = lk.env_value()
    return lk
