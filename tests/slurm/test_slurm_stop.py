"""StopSignal (flag set by USR1/SIGTERM, agreed on by all ranks) and requeue_job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.distributed import free_port
from pretrain.slurm import StopSignal, requeue_job, stop_signals_blocked

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_flag_only(sig):
    stop = StopSignal()
    try:
        assert not stop.should_stop()
        os.kill(os.getpid(), sig)  # delivered to the main thread before kill() returns here
        assert stop.local_flag and stop.received == sig
        assert stop.should_stop() and stop.should_stop()
        assert stop.requeue == (sig == signal.SIGUSR1)
    finally:
        stop.close()
    assert signal.getsignal(sig) is signal.SIG_DFL


def test_previous_python_handler_is_chained_and_restored():
    calls = []

    def previous(signum, frame):
        calls.append(signum)

    original = signal.signal(signal.SIGUSR1, previous)
    try:
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.should_stop()
        assert calls == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is previous
        os.kill(os.getpid(), signal.SIGUSR1)
        assert calls == [signal.SIGUSR1, signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, original)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_while_workers_start_reaches_the_process_after(sig):
    """stop_signals_blocked (around a data loader's worker start) blocks the stop signals in this
    thread only for the while: one sent meanwhile still sets the flag, and the mask is as before."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with StopSignal() as stop:
        with stop_signals_blocked():
            assert sig in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            os.kill(os.getpid(), sig)
        # with other threads in the process (a full suite's), the kernel may hand the signal to one of them
        # when it next runs, and the handler runs in the main thread after: not always by the next line
        deadline = time.monotonic() + 10
        while stop.received is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stop.received == sig
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == before


def test_check_every_defers_the_answer_to_a_multiple():
    stop = StopSignal(check_every=4)
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert [stop.should_stop() for _ in range(5)] == [False, False, False, True, True]
    finally:
        stop.close()


def test_outside_main_thread_is_refused():
    import threading

    errors = []
    t = threading.Thread(target=lambda: errors.append(_try_create()))
    t.start()
    t.join()
    assert "main thread" in errors[0]


def _try_create():
    try:
        StopSignal().close()
    except RuntimeError as err:
        return str(err)
    return "created"


def test_two_gloo_ranks_stop_at_the_same_step():
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        PYTHONPATH=str(REPO_ROOT),
        OMP_NUM_THREADS="1",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "stop_ranks.py"), str(r), "2"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    phase1 = [r[0] for r in results]
    # Only rank 1 was signalled; rank 0 stops at the same step anyway, and both requeue.
    assert [r["stopped_at"] for r in phase1] == [3, 3]
    assert [r["received"] for r in phase1] == [None, signal.SIGUSR1]
    assert [r["requeue"] for r in phase1] == [True, True]
    phase2 = [r[1] for r in results]
    # SIGTERM on any rank outweighs USR1 elsewhere: every rank stops without requeueing.
    assert [r["stopped_at"] for r in phase2] == [2, 2]
    assert [r["received"] for r in phase2] == [signal.SIGTERM, signal.SIGUSR1]
    assert [r["requeue"] for r in phase2] == [False, False]


def test_usr1_asks_for_requeue_sigterm_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path)))
    monkeypatch.setenv("RANK", "0")
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() and stop.requeue
        assert requeue_job({"SLURM_JOB_ID": "5"}, stop=stop) is True
    (tmp_path / "args").unlink()
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)  # scancel after the warning: the cancel wins
        assert stop.should_stop() and not stop.requeue
        assert requeue_job({"SLURM_JOB_ID": "5"}, stop=stop) is False
    assert not (tmp_path / "args").exists()


def _fake_scontrol(tmp_path, exit_code=0):
    """A stand-in scontrol on PATH that records its arguments."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "scontrol"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/args\necho refused >&2\nexit {exit_code}\n')
    script.chmod(0o755)
    return bindir


def test_requeue_reads_the_stop_it_is_given(tmp_path, monkeypatch):
    """The agreed stop is the StopSignal's own state: an earlier run's SIGTERM does not leak
    into a later one, and each answer comes from the object passed."""
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path)))
    monkeypatch.setenv("RANK", "0")
    with StopSignal() as cancelled:
        os.kill(os.getpid(), signal.SIGTERM)
        assert cancelled.should_stop() and cancelled.cancelled
    with StopSignal() as warned:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert warned.should_stop() and not warned.cancelled
    assert requeue_job({"SLURM_JOB_ID": "6"}, stop=cancelled) is False
    assert not (tmp_path / "args").exists()
    assert requeue_job({"SLURM_JOB_ID": "6"}, stop=warned) is True
    assert (tmp_path / "args").read_text().split("\n")[:2] == ["requeue", "6"]


def test_requeue_outside_slurm_is_a_no_op(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path)))
    assert requeue_job({}, stop=None) is False
    assert not (tmp_path / "args").exists()


def test_requeue_from_rank_zero_calls_scontrol(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path)))
    monkeypatch.setenv("RANK", "0")
    assert requeue_job({"SLURM_JOB_ID": "77"}, stop=None) is True
    assert (tmp_path / "args").read_text().split("\n")[:2] == ["requeue", "77"]


def test_requeue_array_task_names_the_task(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path)))
    monkeypatch.setenv("RANK", "0")
    env = {"SLURM_JOB_ID": "78", "SLURM_ARRAY_JOB_ID": "70", "SLURM_ARRAY_TASK_ID": "8"}
    assert requeue_job(env, stop=None) is True
    assert (tmp_path / "args").read_text().split("\n")[:2] == ["requeue", "70_8"]


def test_requeue_on_other_ranks_does_nothing(tmp_path, monkeypatch, without_process_group):
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path)))
    monkeypatch.setenv("RANK", "1")
    assert requeue_job({"SLURM_JOB_ID": "77"}, stop=None) is False
    assert not (tmp_path / "args").exists()


def test_requeue_failure_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path, exit_code=1)))
    monkeypatch.setenv("RANK", "0")
    assert requeue_job({"SLURM_JOB_ID": "79"}, stop=None) is False
    assert "scontrol requeue 79` failed (exit 1): refused" in capsys.readouterr().err


def test_sigterm_after_the_ranks_agreed_on_usr1_cancels_the_requeue(tmp_path, monkeypatch, capsys):
    """scancel while the checkpoint of a USR1 stop is written: the SIGTERM reaches this rank
    after the agreement, and the job must stay cancelled."""
    monkeypatch.setenv("PATH", str(_fake_scontrol(tmp_path)))
    monkeypatch.setenv("RANK", "0")
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.should_stop() and stop.requeue and not stop.cancelled
        os.kill(os.getpid(), signal.SIGTERM)  # the checkpoint is being written
        assert stop.cancelled and not stop.requeue
        assert requeue_job({"SLURM_JOB_ID": "5"}, stop=stop) is False
    assert not (tmp_path / "args").exists()
    assert "not requeueing Slurm job 5: stopped by SIGTERM" in capsys.readouterr().err
