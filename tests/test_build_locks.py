"""kernels/build_locks.py: a build lock left by a killed op build is removed (it would hang every
later start), a live build's lock is waited for, and both are said."""

from __future__ import annotations

import os
import threading
import time

from kernels.build_locks import build_locks, clear_stale_build_locks


def lock_in(root, op: str, age_s: float):
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_a_stale_lock_is_removed_and_named(tmp_path):
    stale = lock_in(tmp_path, "deepspeed_shm_comm", age_s=3600)
    nested = lock_in(tmp_path / "py311_cpu", "memlayers_cpu", age_s=3600)  # torch's default root layout
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "libop.so").touch()
    lines = []
    assert clear_stale_build_locks(tmp_path, max_age_s=600, say=lines.append) == sorted([stale, nested])
    assert not stale.exists() and not nested.exists() and (tmp_path / "other" / "libop.so").exists()
    assert any(
        "removed a stale build lock" in line and "60 min old" in line and "deepspeed_shm_comm" in line for line in lines
    )
    assert clear_stale_build_locks(tmp_path, say=lines.append) == []  # nothing left: returns at once


def test_a_live_build_is_waited_for_not_broken(tmp_path):
    live = lock_in(tmp_path, "memlayers_cpu", age_s=0)
    finished = threading.Timer(0.5, live.unlink)  # the build finishes and releases its lock
    finished.start()
    lines = []
    start = time.monotonic()
    assert clear_stale_build_locks(tmp_path, max_age_s=600, say=lines.append, poll_s=0.05) == []
    assert 0.4 < time.monotonic() - start < 5
    assert len(lines) == 1 and "waiting for another process's build of memlayers_cpu" in lines[0]


def test_a_lock_that_outlives_the_limit_is_removed(tmp_path):
    lock = lock_in(tmp_path, "memlayers_cpu", age_s=0)
    lines = []
    assert clear_stale_build_locks(tmp_path, max_age_s=0.3, say=lines.append, poll_s=0.05) == [lock]
    assert "waiting" in lines[0] and "removed a stale build lock" in lines[1]
    assert build_locks(tmp_path) == []


def test_the_trainer_clears_locks_before_it_starts(tmp_path, data_cache, monkeypatch, capsys):
    """A stale lock in TORCH_EXTENSIONS_DIR: the trainer removes it first, then builds and runs."""
    import shutil

    from pretrain.train import train
    from tests.train.helpers import tiny_config

    extensions = tmp_path / "extensions"
    built = os.environ.get("TORCH_EXTENSIONS_DIR")
    if built and os.path.isdir(built):  # the ops built already: no second build in this test
        shutil.copytree(built, extensions, ignore=shutil.ignore_patterns("lock"))
    stale = lock_in(extensions, "a_killed_build", age_s=3600)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    assert train(tiny_config(tmp_path / "run", data_cache, "train.max_steps=1")).step == 1
    assert not stale.exists() and "removed a stale build lock" in capsys.readouterr().out
