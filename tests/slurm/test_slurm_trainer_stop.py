"""The real trainer's answer to a stop signal under Slurm (in process, a stand-in scontrol on PATH):
a signal at a run's last step does not requeue the finished run; the stop signals Slurm sends to
every process of the job step leave the data loader's worker processes running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pretrain.config import load_config
from pretrain.data import prepare_embedded_dataset
from pretrain.data.loader import ShardLoader
from pretrain.slurm import StopSignal
from pretrain.train import train
from tests.train.helpers import TINY, tiny_config


def _fake_scontrol(tmp_path):
    """A stand-in scontrol on PATH that records the arguments of each call."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "scontrol"
    script.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path}/scontrol-calls\n')
    script.chmod(0o755)
    return bindir


def test_usr1_at_the_last_step_does_not_requeue_the_finished_run(tmp_path, data_cache, monkeypatch, capsys):
    """USR1 (the time limit's warning, a preemption) that lands in a run's last step, evaluation or
    final checkpoint requeued the finished job: it waited in the queue again for all its nodes, loaded
    the model and the last checkpoint and printed 'finished'. Now the run ends as finished, saying that
    the signal came at its last step; a signal before the last step still checkpoints and requeues."""
    monkeypatch.setenv("PATH", f"{_fake_scontrol(tmp_path)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    calls = tmp_path / "scontrol-calls"

    def run(name: str, max_steps: int):
        cfg = load_config(None, [*TINY, f"train.run_dir={tmp_path / name}", f"data.cache_dir={data_cache}"])
        cfg.train.max_steps = max_steps
        with StopSignal() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)  # before the first step: the stop comes after it
            return train(cfg, stop)

    result = run("mid", max_steps=3)  # the mechanism this test relies on: a stop at step 1 of 3 requeues
    assert (result.step, result.stopped_by_signal, result.requeued) == (1, True, True)
    assert calls.read_text().splitlines() == ["requeue 41"]
    calls.unlink()

    capsys.readouterr()
    result = run("last", max_steps=1)
    assert not calls.exists(), calls.read_text()
    assert (result.step, result.stopped_by_signal, result.requeued) == (1, False, False)
    assert result.checkpoint == str(tmp_path / "last" / "checkpoints" / "step_00000001")
    out = capsys.readouterr().out
    assert "stop signal at step 1, the run's last: the run is finished, not requeued" in out, out[-2000:]

    # train.stop_after (a time slice) stops there anyway: a requeued job would resume at that step and
    # train nothing ("train.stop_after=1 is not after step 1"), after its wait in the queue
    cfg = load_config(None, [*TINY, f"train.run_dir={tmp_path / 'slice'}", f"data.cache_dir={data_cache}"])
    cfg.train.max_steps, cfg.train.stop_after = 3, 1
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGUSR1)
        result = train(cfg, stop)
    assert not calls.exists(), calls.read_text()
    assert (result.step, result.stopped_by_signal, result.requeued) == (1, False, False)
    assert "stop signal at step 1, where train.stop_after stops the run: not requeued" in capsys.readouterr().out


def _children() -> set[int]:
    me = str(os.getpid())
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[1] == me:  # ppid
            pids.add(int(stat.parent.name))
    return pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signals_to_the_data_loader_workers_leave_them_reading(tmp_path, data_cache, sig):
    """`scancel`, the time limit and Slurm's preemption send SIGTERM to every process of the job step,
    the data.num_workers workers too. A worker died of it (torch's worker handler), and the trainer's
    next step raised 'DataLoader worker (pid ...) is killed by signal: Terminated' on every rank: the job
    ended without the checkpoint SIGTERM promises (seen on the test cluster with data.num_workers=2).
    USR1 (`scancel --signal=USR1`) killed a worker that had not inherited the trainer's handler, as
    here. The workers now leave the stop to the trainer and go on reading: the batches after the
    signal are those of a loader nobody signalled."""
    cfg = tiny_config(tmp_path / "run", data_cache)
    path = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)

    def batches(signal_workers: bool) -> list[torch.Tensor]:
        before = _children()
        loader = ShardLoader(path, "train", batch_size=2, seq_len=cfg.data.seq_len, num_workers=2, loop=True)
        it = iter(loader)
        out = [next(it).tokens]
        if signal_workers:
            workers = _children() - before
            assert len(workers) == 2, workers
            for pid in workers:  # the second may still be starting: see the test below
                os.kill(pid, sig)
            time.sleep(1.0)  # the workers handle it, and the loader notices a dead one
        out += [next(it).tokens for _ in range(6)]
        it.close()
        return out

    expected = batches(signal_workers=False)
    got = batches(signal_workers=True)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def _batches(path, seq_len: int, count: int) -> list[torch.Tensor]:
    loader = ShardLoader(path, "train", batch_size=2, seq_len=seq_len, num_workers=2, loop=True)
    it = iter(loader)
    out = [next(it).tokens for _ in range(count)]
    it.close()
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_stop_signal_in_a_workers_start_up_leaves_it_reading(tmp_path, data_cache, sig, monkeypatch):
    """A stop signal between a worker's fork and its worker_init_fn (which ignores it) met the
    disposition the worker had then: SIGTERM torch's worker handler, which ended the worker with status
    0 when the trainer's process sent it (as this test does, and as the test above did in a CI run:
    'DataLoader worker (pid 13490) exited by itself with status 0') and killed it when anyone else did
    (Slurm); USR1 the default action where the trainer had no handler (pytest has none). The loader
    then failed the rank instead of reading on. The workers are now forked with the stop signals
    blocked and unblock them once ignored. Here each worker is held in that window (after torch's
    own handlers, before worker_init_fn) until both were signalled."""
    cfg = tiny_config(tmp_path / "run", data_cache)
    path = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
    expected = _batches(path, cfg.data.seq_len, 7)

    from torch.utils.data._utils import signal_handling

    gate = tmp_path / "gate"
    gate.mkdir()
    install_handlers = signal_handling._set_worker_signal_handlers

    def held_in_start_up(*args):  # runs in each forked worker
        install_handlers(*args)
        (gate / str(os.getpid())).touch()
        while not (gate / "go").exists():
            time.sleep(0.01)

    def signal_held_workers():
        deadline = time.monotonic() + 120
        while len(held := [p for p in gate.iterdir() if p.name != "go"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        for pid in held:
            os.kill(int(pid.name), sig)
        (gate / "go").touch()

    monkeypatch.setattr(signal_handling, "_set_worker_signal_handlers", held_in_start_up)
    sender = threading.Thread(target=signal_held_workers)
    sender.start()
    try:
        got = _batches(path, cfg.data.seq_len, 7)
    finally:
        (gate / "go").touch()
        sender.join()
    assert len([p for p in gate.iterdir() if p.name != "go"]) == 2  # both workers were held and signalled
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    assert not {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT} & signal.pthread_sigmask(
        signal.SIG_BLOCK, []
    )  # unblocked


def test_a_stop_signal_after_the_last_step_does_not_kill_the_finished_run(tmp_path, data_cache):
    """The trainer put the default handlers back when its loop ended, before the process group's
    barrier and teardown: USR1 there (the time limit's warning as the run finishes) killed the task
    (USR1's default action), and srun failed the job of a finished run; SIGTERM likewise. The CLI's
    handler now stays until the process exits. Here the signal comes right after train() returns."""
    driver = tmp_path / "driver.py"
    driver.write_text(
        "import os, signal, sys\n"
        "import pretrain.train as T\n"
        "from pretrain.slurm import StopSignal\n"
        "inner = T.train\n"
        "def train(*args, **kwargs):\n"
        "    result = inner(*args, **kwargs)\n"
        "    os.kill(os.getpid(), getattr(signal, sys.argv[1]))\n"
        "    return result\n"
        "T.train = train\n"
        "sys.exit(T.main(sys.argv[2:], stop=StopSignal()))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    for sig in ("SIGUSR1", "SIGTERM"):
        run = tmp_path / sig
        args = [*TINY, "train.max_steps=1", f"train.run_dir={run}", f"data.cache_dir={data_cache}"]
        proc = subprocess.run(
            [sys.executable, str(driver), sig, *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, (sig, proc.returncode, proc.stderr[-2000:])
        assert "finished at step 1" in proc.stdout
