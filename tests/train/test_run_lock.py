"""The run-directory lock (pretrain/run_lock.py) against processes forked while it is held."""

from __future__ import annotations

import os
import signal

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
    with pytest.raises(run_lock.RunDirBusy, match=rf"cannot write .*{run_lock.LOCK_FILE}.*No space left on device"):
        lock.acquire(say=lambda line: None)
    assert not lock.held and lock.fd is None
    monkeypatch.setattr(run_lock.os, "write", real_write)
    again = RunDirLock(tmp_path, is_main=True)
    again.acquire(say=lambda line: None)  # the failed attempt's descriptor no longer holds it
    assert again.held
    again.release()
