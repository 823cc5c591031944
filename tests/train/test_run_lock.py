"""The run-directory lock (pretrain/run_lock.py): against processes forked while it is held, and a
run directory that cannot be written."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pretrain.run_lock as run_lock
from pretrain.run_lock import RunDirLock


def test_a_released_lock_is_free_while_forked_children_live(tmp_path, monkeypatch):
    """Data-loader workers are forked while rank 0 holds the lock and share its descriptor. A run
    that ends (or stops at train.stop_after) while they are still exiting released the lock only
    when the last of them was gone: the next run on the directory in the same process was refused
    as "another job trains" it (CI: test_a_resumed_run_with_data_workers_draws_what_an_uninterrupted_run_draws)."""
    monkeypatch.setattr(run_lock, "WAIT_S", 0.0)
    first = RunDirLock(tmp_path, is_main=True)
    first.acquire(say=lambda line: None)
    child = os.fork()
    if child == 0:  # a worker that outlives the run
        signal.pause()
        os._exit(0)
    try:
        first.release()
        second = RunDirLock(tmp_path, is_main=True)
        second.acquire(say=lambda line: None)  # raised RunDirBusy before the fix
        assert second.held
        second.release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_lock_whose_holder_line_cannot_be_written_is_refused_and_left_free(tmp_path, monkeypatch):
    """Rank 0 writes its host and pid into the lock file once it holds the lock. On a full disk or
    quota that write raised OSError out of acquire on rank 0 alone (a traceback, while the other
    ranks waited in acquire's agreement for it) and the descriptor, lock held, was never closed.
    It is refused as a failed lock creation is, through acquire's agreement, and the lock is free."""
    import errno

    import pytest

    real_write = os.write

    def full_disk(fd, data):
        if bytes(data).startswith(b"host "):  # the holder line; nothing else of the test's
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(run_lock, "WAIT_S", 0.0)
    monkeypatch.setattr(run_lock.os, "write", full_disk)
    lock = RunDirLock(tmp_path, is_main=True)
    with pytest.raises(run_lock.RunDirUnwritable, match=rf"No space left on device \(writing .*{run_lock.LOCK_FILE}\)"):
        lock.acquire(say=lambda line: None)
    assert not lock.held and lock.fd is None
    monkeypatch.setattr(run_lock.os, "write", real_write)
    again = RunDirLock(tmp_path, is_main=True)
    again.acquire(say=lambda line: None)  # the failed attempt's descriptor no longer holds it
    assert again.held
    again.release()


def _unwritable_run_dirs(rank: int, root: str, cache: str) -> dict:
    """Train where train.run_dir lies under a file, then where rank 0 is denied the lock file
    (injected: these tests may run as root, who is denied nothing)."""
    import errno
    import time

    from pretrain.train import train
    from tests.train.helpers import tiny_config

    def attempt(run_dir: Path) -> dict:
        try:
            train(tiny_config(run_dir, Path(cache), "train.max_steps=1"))
            return {"error": None}
        except Exception as err:
            return {"error": type(err).__name__, "message": str(err), "raised_at": time.time()}

    Path(root, "a-file").touch()
    out = {"under a file": attempt(Path(root, "a-file", "run"))}
    real_open, denied = run_lock.os.open, Path(root, "shared", "run")

    def denying_open(path, *args, **kwargs):
        if Path(path).parent == denied:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    denied.mkdir(parents=True, exist_ok=True)
    run_lock.os.open = denying_open
    out["permission"] = attempt(denied)
    run_lock.os.open = real_open
    return out


def test_an_unwritable_run_directory_is_named_as_such_on_every_rank(tmp_path, data_cache):
    """Rank 0's failure to create the lock file was raised as RunDirBusy ('cannot create ...'),
    the error of a run directory another job trains, on every rank. It is RunDirUnwritable (a
    ConfigError: exit status 2), naming the path that refused and the fix."""
    import re

    from tests.train.helpers import run_ranks_outcome

    ranks = run_ranks_outcome(2, _unwritable_run_dirs, (str(tmp_path), str(data_cache)), tmp_path / "out", 120)
    assert all(r is not None and "result" in r for r in ranks), ranks
    expected = {
        "under a file": rf"train.run_dir={tmp_path}/a-file/run cannot be written: {tmp_path}/a-file is a file, not a "
        r"folder\. To run, move it aside, or give this run another train.run_dir",
        "permission": rf"train.run_dir={tmp_path}/shared/run cannot be written: permission denied on "
        rf"{tmp_path}/shared/run\. To run, make {tmp_path}/shared/run writable for the user this job runs as",
    }
    for case, message in expected.items():
        got = [r["result"][case] for r in ranks]
        assert got[0]["error"] == got[1]["error"] == "RunDirUnwritable", got
        assert re.match(message, got[0]["message"]), got[0]["message"]
        assert re.match(rf"rank 0 on \S+: {message}", got[1]["message"]), got[1]["message"]
        assert abs(got[0]["raised_at"] - got[1]["raised_at"]) < 20


def test_a_run_directory_that_is_a_file_is_named_as_one(tmp_path):
    """train.run_dir naming a file (not a folder under one: ENOTDIR) fails the lock's mkdir with EEXIST,
    which was told as 'File exists (...). To run, fix the filesystem'."""
    from pretrain.run_lock import RunDirLock, RunDirUnwritable

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    problem = RunDirLock(str(a_file), True)._try_lock(print)
    assert isinstance(problem, RunDirUnwritable)
    assert str(problem) == (
        f"train.run_dir={a_file} cannot be written: {a_file} is a file, not a folder. To run, move it aside, "
        "or give this run another train.run_dir"
    )
    assert a_file.read_text() == "x"
