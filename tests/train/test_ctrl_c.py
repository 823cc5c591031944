"""Ctrl-C on a training run in a terminal stops it as SIGTERM does: a checkpoint, then exit.

It used to end `python -m pretrain.train` with a KeyboardInterrupt traceback from wherever the step
was (measured: a 200-step run of configs/tiny.yaml stopped at step 5 left no checkpoint at all, exit
status 130), and `make demo` the same, though the demo prints how to continue a run stopped by a signal.
A second Ctrl-C aborts at once; a SIGINT within a second of the first is the same press (torchrun passes
the terminal's on to its ranks, which the terminal reached too: seen arriving within milliseconds).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pretrain.slurm import CTRL_C_NOTE, CTRL_C_SAME_PRESS_S, StopSignal
from tests.train.helpers import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_the_first_ctrl_c_asks_for_a_stop_and_the_second_aborts(capfd):
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with StopSignal(ctrl_c=True) as stop:
        os.kill(os.getpid(), signal.SIGINT)  # handled before the next line runs (main thread)
        assert stop.local_flag and stop.received == signal.SIGINT
        assert stop.should_stop() and stop.cancelled and not stop.requeue  # as SIGTERM: no requeue
        assert capfd.readouterr().err == CTRL_C_NOTE.decode()
        os.kill(os.getpid(), signal.SIGINT)  # torchrun passing the same press on: nothing more
        assert capfd.readouterr().err == "" and stop.received == signal.SIGINT
        time.sleep(CTRL_C_SAME_PRESS_S)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with StopSignal() as stop:  # without ctrl_c (library callers, tests): Python's own handler stays
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_only_the_node_s_local_rank_0_says_what_ctrl_c_does(capfd, monkeypatch):
    """Under torchrun the terminal's press reaches every rank, and every rank printed the note (seen:
    2 notes with 2 CPU ranks). A rank other than its node's first stops as silently, and a second press
    aborts it as it does rank 0, silently too."""
    monkeypatch.setenv("LOCAL_RANK", "1")
    with StopSignal(ctrl_c=True) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.should_stop() and stop.cancelled and not stop.requeue
        assert capfd.readouterr().err == ""
        time.sleep(CTRL_C_SAME_PRESS_S)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with StopSignal(ctrl_c=True) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.local_flag and capfd.readouterr().err == CTRL_C_NOTE.decode()


def test_the_node_s_first_rank_is_read_from_torchrun_or_srun():
    from pretrain.slurm import first_on_its_node

    task = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3"}
    assert first_on_its_node({}) and first_on_its_node({"LOCAL_RANK": "0", "RANK": "2"})
    assert not first_on_its_node({"LOCAL_RANK": "1"})
    assert first_on_its_node({**task, "SLURM_LOCALID": "0"}) and not first_on_its_node({**task, "SLURM_LOCALID": "3"})
    assert first_on_its_node({"SLURM_LOCALID": "3"})  # the batch shell's own process, no srun task
    assert first_on_its_node({**task, "SLURM_LOCALID": "1", "LOCAL_RANK": "0"})  # torchrun inside an srun task


def test_a_process_that_ignores_ctrl_c_keeps_ignoring_it():
    """A shell's background job (`cmd &` in a script) starts with SIGINT ignored, as Python leaves it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopSignal(ctrl_c=True):
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow
def test_ctrl_c_on_the_training_command_checkpoints_and_stops(tmp_path, data_cache):
    """As a terminal sends it: to every process of the job, the data-loader workers too (which
    inherited the handler and each said it would stop, until they ignored SIGINT as they ignore SIGTERM)."""
    run = tmp_path / "run"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    command = [sys.executable, "-m", "pretrain.train", *TINY, "train.max_steps=500", "train.log_every=1"]
    command.append("data.num_workers=2")
    proc = subprocess.Popen(
        [*command, f"train.run_dir={run}", f"data.cache_dir={data_cache}"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's job
    )
    lines = []
    for line in proc.stdout:  # the first step is done: the loop runs
        lines.append(line)
        if "this run's first step took" in line:
            break
    else:
        pytest.fail("the run ended before its first step: " + "".join(lines)[-2000:] + proc.stderr.read()[-2000:])
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err and err.count(CTRL_C_NOTE.decode()) == 1, err[-3000:]
    step = int(out.split("stopped at step ")[1].split()[0])
    assert 1 <= step < 500
    # outside Slurm the last line says how to go on (it said only "not requeued" until 2026-12-07)
    assert out.splitlines()[-1] == (
        f"stopped at step {step} by signal; checkpoint {run / 'checkpoints' / f'step_{step:08d}'}; not a Slurm job, "
        "so not requeued: run the same command again to resume from it"
    ), out[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{step:08d}"


_PRESSED_TWICE = """
import os, signal, sys
sys.path.insert(0, {root!r})
sys.argv = ["memlayers-train"]
from pretrain import slurm, train_cli
slurm.CTRL_C_SAME_PRESS_S = 0.0  # the second SIGINT below counts as a second press


def pressed_twice(argv=None):  # in the start-up, as where a step runs: KeyboardInterrupt from the handler
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    raise AssertionError("the second Ctrl-C did not abort")


train_cli.parse_args = pressed_twice
train_cli.cli()
"""


def test_the_second_ctrl_c_aborts_in_one_line_as_a_ctrl_c_ends_a_process():
    """The abort printed a KeyboardInterrupt traceback from wherever the run was (a page, through DeepSpeed
    and torch mid-step); now one line says what was lost. The process still ends as Python ends one on
    Ctrl-C, killed by SIGINT after its exit functions, so that a shell script running it stops too."""
    script = _PRESSED_TWICE.format(root=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGINT, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0] == CTRL_C_NOTE.decode().strip(), proc.stderr
    assert lines[1].startswith("error: aborted by a second Ctrl-C") and len(lines) == 2, proc.stderr
    # another rank of the node is aborted as silently as it took the first press
    silent = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LOCAL_RANK": "1"},
    )
    assert silent.returncode == -signal.SIGINT and silent.stderr == "", silent.stderr
