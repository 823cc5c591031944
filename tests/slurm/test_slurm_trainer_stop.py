"""The real trainer's answer to a stop signal under Slurm (in process, a stand-in scontrol on PATH):
a signal at a run's last step does not requeue the finished run."""

from __future__ import annotations

import os
import signal

from pretrain.config import load_config
from pretrain.slurm import StopSignal
from pretrain.train import train
from tests.train.helpers import TINY


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
