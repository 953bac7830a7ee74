"""kpnb.core.lock: one writer per folder, stale locks taken over, a holder's children let in."""
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from kpnb.core import lock

from helpers import dead_pid, other_holder

def write_lock(folder, **rec):
    rec = {"host": socket.gethostname(), "command": "kpnb run --resume old", "started": "2026-01-01 10:00:00 UTC",
           "started_unix": time.time() - 3600, **rec}
    (folder / lock.LOCK_NAME).write_text(json.dumps(rec))


@pytest.fixture(autouse=True)
def no_inherited_holder(monkeypatch):
    monkeypatch.setenv(lock.HOLDER_ENV, "")  # restored after each test: holding() sets it meanwhile


def test_lock_and_unlock(tmp_path):
    folder = tmp_path / "run"  # made by the lock
    with lock.FolderLock(folder, "kpnb train vq --run-dir run") as held:
        rec = json.loads((folder / lock.LOCK_NAME).read_text())
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname()
        assert rec["command"] == "kpnb train vq --run-dir run" and rec["started"] and rec["started_unix"] <= time.time()
        assert held.held
    assert not (folder / lock.LOCK_NAME).exists() and not held.held
    held.acquire()  # taken again after a release
    assert (folder / lock.LOCK_NAME).exists()
    held.release()
    assert not (folder / lock.LOCK_NAME).exists()


def test_holders_in_one_process_share_the_file(tmp_path):
    first, second = lock.FolderLock(tmp_path).acquire(), lock.FolderLock(tmp_path).acquire()
    first.release()
    assert (tmp_path / lock.LOCK_NAME).exists()  # the second still holds it
    second.release()
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_a_second_writer_is_refused_naming_the_holder_and_takes_over_once_it_is_gone(tmp_path, capsys):
    with other_holder(tmp_path, "kpnb run --resume RUN --only 03") as p:
        t0 = time.time()
        with pytest.raises(lock.FolderLocked) as e:
            lock.FolderLock(tmp_path).acquire()
        assert time.time() - t0 < 1.0  # a live holder: refused at once, no grace period
        msg = str(e.value)
        assert "kpnb run --resume RUN --only 03" in msg and f"PID {p.pid} on {socket.gethostname()}" in msg
        assert "since" in msg and "Wait for it to finish, or stop it" in msg
    # killed without releasing: its lock file is left behind, naming a PID that no longer runs
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == p.pid
    with lock.FolderLock(tmp_path, "the new writer"):
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["command"] == "the new writer"
    err = capsys.readouterr().err
    assert f"taking over the lock of {tmp_path} from kpnb run --resume RUN --only 03 (PID {p.pid}" in err
    assert "no longer running" in err


def test_a_stale_lock_written_by_hand_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid)
    with lock.FolderLock(tmp_path):
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"kpnb run --resume old (PID {pid} on {socket.gethostname()}), since 2026-01-01 10:00:00 UTC (60 min " \
           f"ago): that process is no longer running" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.stale-*"))


def test_a_lock_from_another_host_is_never_taken_over(tmp_path):
    write_lock(tmp_path, pid=dead_pid(), host="elsewhere.example")
    before = (tmp_path / lock.LOCK_NAME).read_text()
    with pytest.raises(lock.FolderLocked) as e:
        lock.FolderLock(tmp_path).acquire()
    msg = str(e.value)
    assert "on elsewhere.example" in msg and "another machine" in msg
    assert f"delete {tmp_path / lock.LOCK_NAME}" in msg
    assert (tmp_path / lock.LOCK_NAME).read_text() == before


def test_an_empty_lock_file_is_taken_over_after_the_grace_period(tmp_path, capsys):
    (tmp_path / lock.LOCK_NAME).write_text("")  # a writer killed between making the file and writing it
    t0 = time.time()
    with lock.FolderLock(tmp_path):
        assert time.time() - t0 >= lock.GRACE_S
        assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "still empty or unreadable" in capsys.readouterr().err


def test_an_empty_lock_file_written_during_the_grace_period_is_its_writers(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    path.write_text("")
    live = os.getppid()  # a process that runs while this test does

    def finish_writing():
        time.sleep(lock.GRACE_S / 4)
        with open(path, "w") as f:  # the same file, as a writer between os.open and its write would
            f.write(json.dumps({"host": socket.gethostname(), "pid": live, "command": "slow writer"}))

    t = threading.Thread(target=finish_writing)
    t.start()
    with pytest.raises(lock.FolderLocked, match=f"slow writer \\(PID {live} "):
        lock.FolderLock(tmp_path).acquire()
    t.join()


def test_release_keeps_a_lock_that_is_no_longer_ours(tmp_path):
    held = lock.FolderLock(tmp_path).acquire()
    write_lock(tmp_path, pid=os.getppid(), command="took it over")  # e.g. our lock was deleted and retaken
    held.release()
    assert json.loads((tmp_path / lock.LOCK_NAME).read_text())["command"] == "took it over"


INHERITED = "import sys\nfrom kpnb.core import lock\nprint(lock.inherited(sys.argv[1]))"


def _child_says(folder, env):
    r = subprocess.run([sys.executable, "-c", INHERITED, str(folder)], env=env, capture_output=True, text=True,
                       timeout=60)
    return r.stdout.strip()


def test_children_of_a_holder_work_under_its_lock(tmp_path):
    assert not lock.inherited(tmp_path)
    with lock.holding(tmp_path, "kpnb run") as held:
        value = os.environ[lock.HOLDER_ENV]
        assert value == f"{tmp_path.resolve() / lock.LOCK_NAME}:{os.getpid()}"
        assert _child_says(tmp_path, dict(os.environ)) == "True"
        assert _child_says(tmp_path / "other", dict(os.environ)) == "False"  # another folder's lock
        assert _child_says(tmp_path, {**os.environ, lock.HOLDER_ENV: ""}) == "False"
        # a variable naming a holder that is no ancestor (copied into an unrelated process) lets nothing in
        with other_holder(tmp_path / "b") as p:
            env = {**os.environ, lock.HOLDER_ENV: f"{(tmp_path / 'b').resolve() / lock.LOCK_NAME}:{p.pid}"}
            assert _child_says(tmp_path / "b", env) == "False"
        with lock.holding(tmp_path, "nested") as inner:  # an ancestor (here: this process) holds it
            assert inner is None
        assert held.held and (tmp_path / lock.LOCK_NAME).exists()
    assert os.environ[lock.HOLDER_ENV] == ""  # what it was before
    assert not (tmp_path / lock.LOCK_NAME).exists()
    assert _child_says(tmp_path, {**os.environ, lock.HOLDER_ENV: value}) == "False"  # a finished holder's
