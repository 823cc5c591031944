"""`torchrun --max-restarts=1` on 2 CPU ranks, one rank failing mid-run: torchrun's agent stops the other,
starts both again, and the restarted ranks resume by themselves from the latest complete checkpoint (no
option, nothing done by hand) and end where an uninterrupted run ends: every tensor of the last checkpoint
(weights, optimizer states, value shards, loader and RNG states), the slot counts and the TensorBoard loss
log bitwise equal. The lines say what happened: which rank the survivor lost, that torchrun restarts
every rank, which checkpoint the restart resumed from and which restart it is.

Until 2026-12-08 every restart failed at once in the process group's start (`Gloo connectFullMesh failed
... Connection refused`): torchrun's agent store outlives its workers, and the restart met the keys of
the attempt before (pretrain/distributed.py)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import lost_peer
from pretrain.checkpoint import tag_for
from pretrain.distributed import free_port
from pretrain.torchrun_restarts import repeats_on_restart, restarted_now, restarts_used, this_attempt
from pretrain.watchdog import requeue_after_hang
from tests.train.test_crash_consistency import assert_same_run, launch, run_args, wait

REPO_ROOT = Path(__file__).resolve().parents[2]
# the hang watchdog on (the test module's default turns it off) and a short lost-peer grace: a restart must
# meet neither, and the peer watch of a restart that took the first attempt's process ids ends it in 2 s
WATCHED = ("train.hang_timeout_s=120", "train.lost_peer_grace_s=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    log = run.parent / "train.log"
    assert wait(launch("none", 0, run, data_cache, log, world=2, extra=WATCHED), timeout=300) == [0, 0], log.read_text()
    return run


def torchrun(point: str, step: int, rank: int, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """torchrun with one restart, its 2 ranks running the trainer; rank `rank` armed at `point` of step
    `step` in the first attempt only (tests/crash_launch.py)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))},
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
        f"--master-port={free_port()}", "-m", "tests.crash_launch", point, str(step), str(rank), *args,
    ]  # fmt: skip
    log = cwd / "torchrun.log"  # not a pipe: workers that outlive torchrun would hold it open
    with (
        open(log, "w") as out,
        subprocess.Popen(command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT) as agent,
    ):
        try:
            agent.wait(timeout=180)
        except subprocess.TimeoutExpired:
            agent.terminate()  # torchrun ends its workers (each in a session of its own): SIGTERM, SIGKILL 30 s later
            agent.wait(timeout=60)
            pytest.fail(f"torchrun still ran after 180 s: {log.read_text()[-5000:]}")
    return subprocess.CompletedProcess(command, agent.returncode, log.read_text(), "")


@pytest.mark.slow
@pytest.mark.parametrize(
    "point, step, resumed",
    [
        # SIGKILL inside the save of step 4, DeepSpeed's files of .tmp-step_00000004 written: never picked
        ("deepspeed-saved", 4, 3),
        # a Python exception after step 5, before its checkpoint
        ("raise-after-step", 5, 4),
    ],
)
def test_torchrun_restarts_the_ranks_into_an_exact_resume(tmp_path, data_cache, uninterrupted, point, step, resumed):
    run = tmp_path / "run"
    done = torchrun(point, step, 1, run_args(run, data_cache, *WATCHED), tmp_path)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-5000:]
    checkpoint = run / "checkpoints" / tag_for(resumed)
    (lost,) = [line for line in text.splitlines() if line.startswith("error: ")]
    assert lost.startswith(f"error: rank 0 on {socket.gethostname()} lost rank 1 on "), lost
    assert lost.endswith(
        f"The run resumes from {checkpoint}: torchrun restarts every rank now (restart 1 of --max-restarts=1)"
    ), lost
    if point == "deepspeed-saved":
        assert f"ignored the unfinished checkpoint {run / 'checkpoints' / '.tmp-step_00000004'}" in text, text[-5000:]
    else:
        assert "RuntimeError: injected fault after step 5" in text, text[-5000:]
    assert f"resumed from {checkpoint} at step {resumed} (torchrun restart 1 of --max-restarts=1)" in text
    assert f"finished at step 6; checkpoint {run / 'checkpoints' / tag_for(6)}" in text
    assert not (run / "hangs").exists(), sorted((run / "hangs").rglob("*"))
    assert_same_run(run, uninterrupted)


def torchrun_env(done: int, allowed: int) -> dict[str, str]:
    """What torchrun's agent sets in its workers' environment about restarts (torch 2.13)."""
    return {
        "TORCHELASTIC_RUN_ID": "none",
        "TORCHELASTIC_RESTART_COUNT": str(done),
        "TORCHELASTIC_MAX_RESTARTS": str(allowed),
    }


def test_the_lines_say_which_restart_torchrun_makes_and_how_many_are_left():
    first = torchrun_env(0, 3)
    assert restarted_now(first) == "torchrun restarts every rank now (restart 1 of --max-restarts=3)"
    assert this_attempt(first) is None and restarts_used(first) is None
    last = torchrun_env(3, 3)
    assert restarted_now(last) is None and repeats_on_restart(last) is None
    assert this_attempt(last) == "torchrun restart 3 of --max-restarts=3"
    assert restarts_used(last) == "torchrun has used its --max-restarts=3"
    for plain in (torchrun_env(0, 0), {}):  # torchrun without --max-restarts; no torchrun
        assert {restarted_now(plain), restarts_used(plain), this_attempt(plain), repeats_on_restart(plain)} == {None}
    assert repeats_on_restart(torchrun_env(1, 3)).startswith(
        "note: torchrun (--max-restarts=3) restarts every rank 2 more times, and a restart resumes from the same "
        "checkpoint with the same config and data, so it most likely stops here again"
    )
    assert "restarts every rank once more," in repeats_on_restart(torchrun_env(2, 3))


def test_the_survivor_and_the_hang_watchdog_leave_the_restart_to_torchrun(tmp_path, monkeypatch):
    """The survivor of a lost rank said 'start torchrun again as before (its ranks run ...)' while torchrun,
    with a restart left, was restarting every rank by itself; the hang watchdog 'restart the run'."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(sys, "argv", [str(Path(lost_peer.__file__).with_name("train.py")), "--config", "c.yaml"])
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    root = tmp_path / "checkpoints"
    (root / tag_for(4)).mkdir(parents=True)
    (root / "latest").write_text(tag_for(4))
    for key, value in torchrun_env(0, 1).items():
        monkeypatch.setenv(key, value)
    assert lost_peer.resume_command() == "torchrun restarts every rank now (restart 1 of --max-restarts=1)"
    assert requeue_after_hang(tmp_path, root, False, True) == (
        "not requeued (not a Slurm job): torchrun restarts every rank now (restart 1 of --max-restarts=1), which "
        "resumes from step_00000004"
    )
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # the restart: none left
    assert lost_peer.resume_command() == (
        "torchrun has used its --max-restarts=1: start torchrun again as before (its ranks run python -m "
        "pretrain.train --config c.yaml)"
    )
    assert requeue_after_hang(tmp_path, root, False, True).endswith("restart the run to resume from step_00000004")


def test_a_refusal_under_torchrun_says_a_restart_will_meet_it_again(tmp_path):
    """A config refused under torchrun --max-restarts=3 was refused 4 times within seconds, said each time
    as if for the first; a run that diverged retrained from its checkpoint into the same stop 3 times. The
    ranks cannot keep torchrun from restarting them: the refusal now says that a restart repeats it."""
    command = [sys.executable, "-m", "pretrain.train", "--config", str(REPO_ROOT / "configs" / "tiny.yaml")]
    port, said = str(free_port()), {}
    for rank in ("0", "1"):  # the ranks of one node: each refuses, its local rank 0 alone says so
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))},
            **torchrun_env(0, 3),
            "RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "PYTHONPATH": str(REPO_ROOT),
        }  # fmt: skip
        refused = subprocess.run(
            [*command, "train.micro_batch=7", f"train.run_dir={tmp_path / 'run'}"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr[-3000:]
        said[rank] = refused.stderr.strip()
    assert said["1"] == "", said["1"]
    error, note = said["0"].splitlines()
    assert error.startswith("error: train.global_batch=16 is not divisible by train.micro_batch=7"), error
    assert note == repeats_on_restart(torchrun_env(0, 3)), note


def test_a_refusal_after_torch_is_imported_says_so_too(monkeypatch, capsys):
    """The same note where the trainer refuses after its start (pretrain.train.main: a config read on
    every rank, a damaged checkpoint, out of memory)."""
    from pretrain.train import main

    for key, value in torchrun_env(0, 2).items():
        monkeypatch.setenv(key, value)
    assert main(["--config", str(REPO_ROOT / "configs" / "tiny.yaml"), "train.keep_checkpoints=0"]) == 2
    error, note = capsys.readouterr().err.strip().splitlines()
    assert error.startswith("error: train.keep_checkpoints=0"), error
    assert note == repeats_on_restart(torchrun_env(0, 2)), note


def test_the_survivor_does_not_promise_a_restart_that_will_refuse_the_checkpoints(tmp_path, monkeypatch):
    """Rank 0 killed between renaming its first checkpoint and writing `latest` (crash_launch's 'renamed',
    under torchrun --max-restarts=1): the survivor said '... no 'latest' file ...: torchrun restarts every
    rank now', and the restart refused the checkpoints at once, as the survivor's own line had said it would."""
    for key, value in torchrun_env(0, 1).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / "checkpoints" / tag_for(2)).mkdir(parents=True)
    line = lost_peer._what_next(tmp_path, finished=False)
    assert "but no 'latest' file naming the one to resume from" in line, line
    assert line.endswith(
        "; torchrun restarts every rank now (restart 1 of --max-restarts=1), which refuses them the same way: stop "
        "torchrun (Ctrl-C), put them right, then start torchrun again as before"
    ), line
