"""A rank whose peer process died: the communication backend's error, told as one line.

When a rank's process ends mid-run (the out-of-memory killer, a time limit, a crash of its own, its
node failing), every rank that meets it next in a collective gets the backend's error: gloo's
`Connection closed by peer [10.0.0.7]:41235` or `Read error [...]: Connection reset by peer`, NCCL's
`remote process exited`, under a page of traceback through DeepSpeed and torch.distributed, which
names neither the rank that died nor what to do. `explain_lost_peer` turns it into `LostPeer`: which
rank was lost (from the hosts and process ids the ranks announced at the rendezvous: on this node
the dead process is found by its id, on another node the ranks there are named), where this rank
was, the checkpoint the run resumes from and the command that resumes it. The cause of the death is
in the dead rank's own output, not here: the message says so.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import re
import shlex
import socket
import sys
import time
from pathlib import Path

import torch.distributed as dist

from pretrain.distributed import describe_ranks, rank_processes
from pretrain.files import pid_alive
from pretrain.watchdog import process_state

_CLOSED = (
    "Connection closed by peer",  # gloo, in a read: "Connection closed by peer [127.0.0.1]:29611"
    "Connection reset by peer",  # gloo: "Read error [127.0.0.1]:22739: Connection reset by peer"
    "Broken pipe",  # gloo, in a write
    "remote process exited",  # NCCL: "remote process exited or there was a network error"
)
_ADDRESS = re.compile(r"\[([^\]]+)\]:\d+")  # gloo's "[10.0.0.7]:41235": the peer's address, port


class LostPeer(RuntimeError):
    """Another rank's process ended mid-run; the message names it and how to resume."""


def lost_peer(err: BaseException) -> tuple[bool, str | None]:
    """(whether `err` is the backend's report of a peer that went away, the peer's address where it names one)."""
    # the backend's own (a plain RuntimeError, or DistBackendError), not an error of this project that quotes one
    from_backend = type(err) is RuntimeError or isinstance(err, dist.DistError)
    if not from_backend or not any(mark in str(err) for mark in _CLOSED):
        return False, None
    address = _ADDRESS.search(str(err))
    return True, address.group(1) if address else None


@functools.lru_cache(maxsize=None)
def _addresses(host: str) -> frozenset[str]:
    try:
        return frozenset(socket.gethostbyname_ex(host)[2])
    except OSError:
        return frozenset()


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _runs_on(host: str, address: str) -> bool:
    """Whether a rank on `host` is reached at `address`."""
    here = socket.gethostname()
    return address in _addresses(host) or (host == here and (_is_loopback(address) or address in _addresses(here)))


def _has_ended(pid: int) -> bool:
    """Gone, or a zombie (ended; its parent, the launcher, has not collected it yet)."""
    return not pid_alive(pid) or process_state(pid).startswith("Z")


def _ended(ranks: list[int], pids: list[int], wait_s: float = 2.0) -> list[int]:
    """The ranks among `ranks` (on this host, process ids `pids`) whose process has ended, waiting up to
    `wait_s` for one: a peer's connection closes as its process exits, a moment before it has ended."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = [r for r, pid in zip(ranks, pids) if _has_ended(pid)]
        if dead or not ranks or time.monotonic() > deadline:
            return dead
        time.sleep(0.05)


def lost_ranks(me: int, peer: str | None, processes: list[tuple[str, int]] | None) -> str:
    """Who rank `me` lost, as far as it can tell from the ranks' (host, process id)
    (`distributed.rank_processes`) and the peer's address: 'rank 1 on node3 (process 4242 has
    ended)' on this node, 'rank 5 on node7' or 'one of ranks 4, 5, 6 on node7' on another, 'rank 0'
    where the store rank 0's process serves no longer answers."""
    if processes == []:
        return "rank 0 (its process, which serves the rendezvous store, no longer answers)"
    if processes is None:  # a process group this process did not make: nothing announced
        return f"the rank at {peer}" if peer else "another rank"
    here = socket.gethostname()
    others = [r for r in range(len(processes)) if r != me]
    if peer is not None:
        others = [r for r in others if _runs_on(processes[r][0], peer)] or others
    local = [r for r in others if processes[r][0] == here]
    dead = _ended(local, [processes[r][1] for r in local])
    if dead:
        pids = ", ".join(str(processes[r][1]) for r in dead[:8]) + (", ..." if len(dead) > 8 else "")
        ended = f"process {pids} has ended" if len(dead) == 1 else f"processes {pids} have ended"
        return f"{describe_ranks(dead)} on {here} ({ended})"
    hosts = sorted({processes[r][0] for r in others})
    on = ", ".join(hosts[:4]) + (", ..." if len(hosts) > 4 else "")
    return f"rank {others[0]} on {on}" if len(others) == 1 else f"one of {describe_ranks(others)} on {on}"


def resume_command() -> str:
    """How to start this run again: the Slurm job requeued, else this rank's own command line."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"scontrol requeue {job} (or the same memlayers-submit command with --resume)"
    argv = list(sys.argv) or ["memlayers-train"]
    if Path(argv[0]).resolve() == Path(__file__).resolve().with_name("train.py"):  # python -m pretrain.train
        argv = ["python", "-m", "pretrain.train", *argv[1:]]
    else:
        argv[0] = Path(argv[0]).name
    return f"start every rank again as before ({shlex.join(argv)} on rank {dist.get_rank()})"


def describe(run_dir: Path, rank: int, where: str, err: BaseException, peer: str | None) -> str:
    from pretrain.checkpoint import CheckpointError, latest_checkpoint

    try:
        latest = latest_checkpoint(Path(run_dir) / "checkpoints")
        resumes = f"from {latest}" if latest is not None else "from the start (no checkpoint yet)"
    except CheckpointError as refusal:  # what a resume would refuse (no `latest` beside checkpoints), and its fix
        resumes = f"only once its checkpoints are put right: {refusal}"
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    backend = re.sub(r"^\[[^\]]*\] ", "", first_line).split(". ")[0]  # gloo's source position, its chatty tail
    lost = lost_ranks(rank, peer, rank_processes())
    return (
        f"rank {rank} on {socket.gethostname()} lost {lost} {where} ({dist.get_backend()}: {backend}): that rank's own "
        f"output says why it ended (a traceback; nothing where it was killed: the out-of-memory killer, a time "
        f"limit, its node failing). This rank stops too. The run resumes {resumes}: {resume_command()}"
    )


@contextlib.contextmanager
def explain_lost_peer(cfg, info, watchdog):
    """Turn the backend's error for a peer that went away inside into `LostPeer`, placed by the
    watchdog's last progress (the step, evaluation or checkpoint this rank finished last)."""
    try:
        yield
    except RuntimeError as err:
        lost, peer = lost_peer(err)
        if not lost or info.world_size == 1:
            raise
        last = watchdog.last_progress
        where = f"after {last}" if last else "before this run's first step finished"
        raise LostPeer(describe(cfg.train.run_dir, info.rank, where, err, peer)) from None
