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
