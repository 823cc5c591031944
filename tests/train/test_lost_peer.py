"""A rank whose peer process dies mid-run (world 2, gloo; the peer killed by SIGKILL as by the
out-of-memory killer, tests/crash_launch.py): the survivor ends with one line naming the lost rank,
the checkpoint the run resumes from and the command, exit status 1. It printed a page of traceback
through DeepSpeed and torch.distributed ending in gloo's 'Connection closed by peer [127.0.0.1]:29611',
which named no rank (pretrain/lost_peer.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed import DistBackendError

from pretrain import lost_peer, watchdog
from pretrain.checkpoint import CheckpointError, tag_for
from pretrain.distributed import free_port
from tests.crash_launch import start
from tests.train.test_crash_consistency import launch, run_args, wait


@pytest.mark.parametrize("dead", [1, 0])  # rank 0's process also serves the rendezvous store
def test_the_surviving_rank_names_the_dead_one_and_the_resume(tmp_path, data_cache, dead):
    run, log = tmp_path / "run", tmp_path / "train.log"
    children = launch("deepspeed-saved", 2, run, data_cache, log, world=2, killed_rank=dead)
    codes = wait(children, timeout=300)
    survivor = 1 - dead
    assert codes[dead] == -signal.SIGKILL and codes[survivor] == 1, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]
    (line,) = [line for line in text.splitlines() if line.startswith("error: ")]
    host = socket.gethostname()
    if dead == 1:
        lost = f"lost rank 1 on {host} (process {children[1].pid} has ended)"
    else:
        lost = "lost rank 0 (its process, which serves the rendezvous store, no longer answers)"
    assert line.startswith(f"error: rank {survivor} on {host} {lost} after "), line
    assert "gloo: " in line and "that rank's own output says why it ended" in line
    assert (
        f"The run resumes from {run / 'checkpoints' / tag_for(1)}: start every rank again as before (memlayers-train "
        in line
    )
    assert line.endswith(f" on rank {survivor})")
    if dead == 1:  # as it says: the same command on every rank resumes the run
        assert wait(launch("none", 0, run, data_cache, tmp_path / "resumed.log", world=2), timeout=300) == [0, 0]
        assert f"resumed from {run / 'checkpoints' / tag_for(1)}" in (tmp_path / "resumed.log").read_text()


def test_a_rank_on_another_node_is_named_by_the_peer_address(monkeypatch):
    here = socket.gethostname()
    table = {"node7": frozenset({"10.0.0.7"}), "node8": frozenset({"10.0.0.8"})}
    monkeypatch.setattr(lost_peer, "_addresses", lambda host: table.get(host, frozenset()))
    processes = [(here, 1), ("node7", 2), ("node8", 3), ("node8", 4)]
    assert lost_peer.lost_ranks(0, "10.0.0.7", processes) == "rank 1 on node7"
    assert lost_peer.lost_ranks(0, "10.0.0.8", processes) == "one of ranks 2, 3 on node8"
    everywhere = ", ".join(sorted({here, "node7", "node8"}))
    assert lost_peer.lost_ranks(2, None, processes) == f"one of ranks 0, 1, 3 on {everywhere}"  # NCCL: no address
    dead = subprocess.Popen(["true"])  # a process that has ended, and been reaped
    dead.wait()
    processes[3] = (here, dead.pid)
    assert lost_peer.lost_ranks(0, None, processes) == f"rank 3 on {here} (process {dead.pid} has ended)"
    also = subprocess.Popen(["true"])
    also.wait()
    processes[2] = (here, also.pid)
    both = f"ranks 2, 3 on {here} (processes {also.pid}, {dead.pid} have ended)"  # was 'process A, B has ended'
    assert lost_peer.lost_ranks(0, None, processes) == both


def test_a_rank_whose_process_is_a_zombie_has_ended():
    """A killed rank stays a zombie until its launcher collects it: it has ended, and is named so
    (the launch test's rank is mostly collected already by the time the survivor looks)."""
    import time

    here = socket.gethostname()
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 30
    while watchdog.process_state(zombie.pid)[0] != "Z":  # exited, not collected (no wait yet)
        assert time.monotonic() < deadline, watchdog.process_state(zombie.pid)
        time.sleep(0.01)
    try:
        assert lost_peer._has_ended(zombie.pid) and not lost_peer._has_ended(os.getpid())
        processes = [(here, os.getpid()), (here, zombie.pid)]
        assert lost_peer.lost_ranks(0, None, processes) == f"rank 1 on {here} (process {zombie.pid} has ended)"
    finally:
        zombie.wait()


@pytest.mark.parametrize(
    "message, lost, peer",
    [
        ("[pair.cc:553] Connection closed by peer [10.0.0.7]:29611. This is typically", True, "10.0.0.7"),
        ("[pair.cc:537] Read error [127.0.0.1]:22739: Connection reset by peer. This is", True, "127.0.0.1"),
        ("NCCL error: remote process exited or there was a network error", True, None),
        # the store, rank 0's process gone, while a process group is made (DistNetworkError)
        ("Failed to recv, got 0 bytes. Connection was likely closed. Did the remote server shutdown", True, None),
        ("CUDA error: an illegal memory access was encountered", False, None),
    ],
)
def test_which_backend_errors_are_a_lost_peer(message, lost, peer):
    assert lost_peer.lost_peer(RuntimeError(message)) == (lost, peer)
    assert lost_peer.lost_peer(DistBackendError(message)) == (lost, peer)
    assert lost_peer.lost_peer(CheckpointError(message)) == (False, None)  # the project's own, quoting one


def test_the_resume_command_is_the_one_this_rank_ran_or_the_slurm_jobs(monkeypatch):
    monkeypatch.setattr(lost_peer.dist, "get_rank", lambda: 3)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    train_py = Path(lost_peer.__file__).with_name("train.py")
    monkeypatch.setattr(sys, "argv", [str(train_py), "--config", "configs/tiny.yaml", "train.run_dir=runs/a b"])
    expected = "python -m pretrain.train --config configs/tiny.yaml 'train.run_dir=runs/a b' on rank 3"
    assert lost_peer.resume_command() == f"start every rank again as before ({expected})"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert lost_peer.resume_command().startswith("scontrol requeue 4242 ")


def test_the_resume_command_of_a_torchrun_worker_is_torchrun_on_every_node(monkeypatch):
    """Under `torchrun --nnodes=2` (two simulated nodes) the survivor said 'start every rank again as before
    (python -m pretrain.train ... on rank 0)': that command, started alone, trains on one rank."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    train_py = Path(lost_peer.__file__).with_name("train.py")
    monkeypatch.setattr(sys, "argv", [str(train_py), "--config", "configs/tiny.yaml"])
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")  # what torchrun sets in its workers' environment
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert lost_peer.resume_command() == (
        "start torchrun again as before on each of its 2 nodes (its ranks run python -m pretrain.train --config "
        "configs/tiny.yaml)"
    )
    monkeypatch.setenv("GROUP_WORLD_SIZE", "1")
    assert lost_peer.resume_command().startswith("start torchrun again as before (its ranks run python -m ")


def test_checkpoints_a_resume_would_refuse_are_not_called_the_start(tmp_path, monkeypatch):
    """Rank 0 killed between renaming its first checkpoint and writing `latest` (crash_launch's
    'renamed' point) leaves checkpoints/step_00000001 without `latest`, which a resume refuses. The
    survivor said 'The run resumes from the start (no checkpoint yet)': it now passes on the refusal,
    which names the fix, as a resume would print it."""
    monkeypatch.setattr(lost_peer, "rank_processes", lambda: [])
    monkeypatch.setattr(lost_peer.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(lost_peer.dist, "get_rank", lambda: 1)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / "checkpoints" / tag_for(1)).mkdir(parents=True)
    err = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:29611")
    line = lost_peer.describe(tmp_path, 1, "after step 1", err, "127.0.0.1")
    assert "from the start" not in line, line
    refusal = "holds checkpoints (step_00000001) but no 'latest' file naming the one to resume from"
    assert f"The run resumes only once its checkpoints are put right: {tmp_path / 'checkpoints'} {refusal}" in line
    assert line.endswith(" on rank 1)")  # then the command, as when it resumes


def test_a_peer_lost_after_a_stop_before_max_steps_still_names_the_resume(tmp_path, monkeypatch):
    """At the last barrier of a run stopped by train.stop_after or a signal the run is not finished:
    the line names the checkpoint and command that go on; only a run at train.max_steps is told finished."""
    monkeypatch.setattr(lost_peer.dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(lost_peer.dist, "get_rank", lambda: 0)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    last = tmp_path / "checkpoints" / tag_for(3)
    last.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text(tag_for(3))
    err = RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:29611")
    stopped = lost_peer.describe(tmp_path, 0, "after this run ended at step 3", err, "127.0.0.1", [])
    assert f"The run resumes from {last}: start every rank again as before (" in stopped, stopped
    done = lost_peer.describe(tmp_path, 0, "after this run ended at step 3", err, "127.0.0.1", [], finished=True)
    assert done.endswith(
        f"The run had finished (train.max_steps reached); its last checkpoint is {last}: nothing is left to train"
    ), done


@pytest.mark.parametrize(
    "point, where, extra",
    [
        ("config-shared", "while the ranks checked the config (gloo: ", ()),
        # gloo making DeepSpeed's group waited on the store for the dead rank, 720 s here (32 minutes by
        # default), then failed with a timeout that named no rank: the survivor's watch ends it, after
        # train.lost_peer_grace_s (20 s by default; waiting those out was this test's 21 s)
        (
            "deepspeed-initialize",
            "before this run's first step finished (gloo: no error, still waiting for it 3 s",
            ("train.lost_peer_grace_s=3",),
        ),
        ("final-barrier", "after this run ended at step 6 (gloo: ", ()),
    ],
)
def test_a_rank_lost_at_start_up_or_shutdown_is_named_in_one_line(tmp_path, data_cache, point, where, extra):
    run, log = tmp_path / "run", tmp_path / "train.log"
    children = launch(point, 0, run, data_cache, log, world=2, killed_rank=1, extra=extra)
    codes = wait(children, timeout=300)
    text = log.read_text()
    assert codes == [1, -signal.SIGKILL], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    (line,) = [line for line in text.splitlines() if line.startswith("error: ")]
    lost = f"lost rank 1 on {socket.gethostname()} (process {children[1].pid} has ended)"
    assert line.startswith(f"error: rank 0 on {socket.gethostname()} {lost} {where}"), line
    if point == "final-barrier":  # train.max_steps reached: it used to say the run resumes from step 6
        last = run / "checkpoints" / tag_for(6)
        assert line.endswith(
            f"The run had finished (train.max_steps reached); its last checkpoint is {last}: nothing is left to train"
        ), line
        assert "resumes" not in line, line
    else:
        assert "The run resumes from the start" in line, line


@pytest.mark.parametrize("value", ["0", "-1", ".nan"])
def test_a_lost_peer_grace_that_is_not_positive_is_refused_at_load(value):
    from pretrain.config import ConfigError, load_config

    assert load_config(None).train.lost_peer_grace_s == 20
    with pytest.raises(ConfigError, match=r"train.lost_peer_grace_s=\S+ must be > 0"):
        load_config(None, [f"train.lost_peer_grace_s={value}"])


def test_a_multi_rank_profile_whose_peer_dies_ends_in_one_line(tmp_path, data_cache):
    run, log = tmp_path / "run", tmp_path / "profile.log"
    port = str(free_port())
    args = ["--steps", "3", *run_args(run, data_cache)]
    children = [
        start(
            "after-step" if rank == 1 else "none",
            1,
            "profile",
            args,
            log,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        for rank in range(2)
    ]
    codes = wait(children, timeout=300)
    text = log.read_text()
    assert codes == [1, -signal.SIGKILL], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    (line,) = [line for line in text.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: rank 0 on {socket.gethostname()} lost rank 1 on "), line
    assert " at step 1 (gloo: " in line, line  # the last step or checkpoint finished


_WATCHING_RANK = """
import sys, time
sys.path.insert(0, {root!r})
import torch.distributed as dist
from pretrain.distributed import init_distributed
from pretrain.lost_peer import LocalPeerWatch
init_distributed(120, 120)
if dist.get_rank() == 0:
    with LocalPeerWatch({run!r}, lambda: "while watching", grace_s=1.0):
        time.sleep(5)
    print("rank 0 watched to the end", flush=True)
dist.barrier()
"""


def test_a_rank_in_another_pid_namespace_on_the_same_host_is_not_taken_for_ended(tmp_path):
    """Ranks on one host in containers of their own (one PID namespace each, the host's name and network):
    a peer's process id means nothing in this rank's namespace, where it names no process, or another.
    LocalPeerWatch took the live peer for ended and killed this healthy rank with a 'lost rank 1' line.
    Here rank 0 runs in a PID namespace of its own (unshare), rank 1 in this one."""
    if subprocess.run(["unshare", "-Urpf", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("no unprivileged PID namespaces here (unshare -Urpf)")
    script = _WATCHING_RANK.format(root=str(Path(__file__).resolve().parents[2]), run=str(tmp_path / "run"))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    ranks = [
        subprocess.Popen(
            [*(["unshare", "-Urpf", "--mount-proc"] if rank == 0 else []), sys.executable, "-c", script],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [rank.communicate(timeout=240)[0] for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert "rank 0 watched to the end" in outputs[0], outputs[0][-3000:]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs


def test_rank_0_lost_while_a_group_is_made_is_named_without_a_second_store_warning(tmp_path, data_cache):
    """Rank 0 dead in deepspeed.initialize: the survivor's store read fails (DistNetworkError), and torch
    warns with ~50 lines of C++ frames. Asking the dead store who was lost warned a second time."""
    run, log = tmp_path / "run", tmp_path / "train.log"
    children = launch("deepspeed-initialize", 0, run, data_cache, log, world=2, killed_rank=0)
    codes = wait(children, timeout=300)
    text = log.read_text()
    assert codes == [-signal.SIGKILL, 1], text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    (line,) = [line for line in text.splitlines() if line.startswith("error: ")]
    lost = "lost rank 0 (its process, which serves the rendezvous store, no longer answers)"
    assert line.startswith(f"error: rank 1 on {socket.gethostname()} {lost} before this run's first step"), line
    assert text.count("TCPStore.cpp") <= 1, text[-6000:]  # torch's own, from the store read that failed
