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
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from pretrain.distributed import describe_ranks, rank_processes
from pretrain.files import pid_alive
from pretrain.torchrun_restarts import restarted_now, restarts_used
from pretrain.watchdog import process_state

_CLOSED = (
    "Connection closed by peer",  # gloo, in a read: "Connection closed by peer [127.0.0.1]:29611"
    "Connection reset by peer",  # gloo: "Read error [127.0.0.1]:22739: Connection reset by peer"
    "Broken pipe",  # gloo, in a write
    "remote process exited",  # NCCL: "remote process exited or there was a network error"
    # the rendezvous store, whose server (rank 0's process) is gone, while a group is made (DistNetworkError)
    "Connection was likely closed",  # "Failed to recv, got 0 bytes. Connection was likely closed. Did ..."
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


def lost_ranks(me: int, peer: str | None, processes: list[tuple[str, int | None]] | None) -> str:
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
    local = [r for r in others if processes[r][0] == here and processes[r][1] is not None]  # None: not seen here
    dead = _ended(local, [processes[r][1] for r in local])
    if dead:
        pids = ", ".join(str(processes[r][1]) for r in dead[:8]) + (", ..." if len(dead) > 8 else "")
        ended = f"process {pids} has ended" if len(dead) == 1 else f"processes {pids} have ended"
        return f"{describe_ranks(dead)} on {here} ({ended})"
    hosts = sorted({processes[r][0] for r in others})
    on = ", ".join(hosts[:4]) + (", ..." if len(hosts) > 4 else "")
    return f"rank {others[0]} on {on}" if len(others) == 1 else f"one of {describe_ranks(others)} on {on}"


def resume_command() -> str:
    """How to start this run again: the Slurm job requeued, torchrun started again on each of its nodes
    (a rank's own command line, `python -m pretrain.train ...`, started alone trains on one rank) or, with a
    restart of its --max-restarts left, nothing (torchrun restarts every rank), else this rank's own command line."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"scontrol requeue {job} (or the same memlayers-submit command with --resume)"
    argv = list(sys.argv) or ["memlayers-train"]
    if Path(argv[0]).resolve() == Path(__file__).resolve().with_name("train.py"):  # python -m pretrain.train
        argv = ["python", "-m", "pretrain.train", *argv[1:]]
    else:
        argv[0] = Path(argv[0]).name
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: torchrun's agent holds the launch command
        restarted = restarted_now()
        if restarted:  # --max-restarts with one left: nothing to do by hand
            return restarted
        nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        where = "" if nodes == "1" else f" on each of its {nodes} nodes"
        used = restarts_used()
        again = f"start torchrun again as before{where} (its ranks run {shlex.join(argv)})"
        return f"{used}: {again}" if used else again
    return f"start every rank again as before ({shlex.join(argv)} on rank {dist.get_rank()})"


def _what_next(run_dir: Path, finished: bool) -> str:
    """The line's end: the checkpoint the run resumes from and the command, or, where the run had
    reached train.max_steps (`finished`), that nothing is left to train."""
    from pretrain.checkpoint import CheckpointError, latest_checkpoint

    try:
        latest = latest_checkpoint(Path(run_dir) / "checkpoints")
    except CheckpointError as refusal:  # what a resume would refuse (no `latest` beside checkpoints), and its fix
        restarted = restarted_now()
        if restarted:  # torchrun --max-restarts: its restart meets the same refusal
            return (
                f"The run resumes only once its checkpoints are put right: {refusal}; {restarted}, which refuses "
                "them the same way: stop torchrun (Ctrl-C), put them right, then start torchrun again as before"
            )
        return f"The run resumes only once its checkpoints are put right: {refusal}: {resume_command()}"
    if finished:  # a rerun would start from the last checkpoint and train nothing
        last = f"; its last checkpoint is {latest}" if latest is not None else ""
        return f"The run had finished (train.max_steps reached){last}: nothing is left to train"
    resumes = f"from {latest}" if latest is not None else "from the start (no checkpoint yet)"
    return f"The run resumes {resumes}: {resume_command()}"


def describe(
    run_dir: Path,
    rank: int,
    where: str,
    err: BaseException | str,
    peer: str | None,
    processes=None,
    finished: bool = False,
) -> str:
    """The one line; `err`: the backend's error, or what this rank was doing where it raised none;
    `processes`: the ranks' (host, process id), read from the store where not given; `finished`: the
    run had reached train.max_steps (a peer lost at the last barrier), so there is nothing to resume."""
    if isinstance(err, str):
        backend = err
    else:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        backend = re.sub(r"^\[[^\]]*\] ", "", first_line).split(". ")[0]  # gloo's source position, its chatty tail
    if processes is None:  # the store's own error: its server, rank 0's process, is gone (a read warns again)
        processes = [] if isinstance(err, dist.DistNetworkError) else rank_processes()
    lost = lost_ranks(rank, peer, processes)
    return (
        f"rank {rank} on {socket.gethostname()} lost {lost} {where} ({dist.get_backend()}: {backend}): that rank's own "
        f"output says why it ended (a traceback; nothing where it was killed: the out-of-memory killer, a time "
        f"limit, its node failing). This rank stops too. {_what_next(run_dir, finished)}"
    )


@contextlib.contextmanager
def explain_lost_peer(run_dir: str | Path, where: Callable[[], str], finished: bool = False):
    """Turn the backend's error for a peer that went away inside into `LostPeer`; `where()`: this
    rank's position then ('after step 12', `since_progress`); the run resumes from `run_dir`'s
    checkpoints, unless it had `finished` (train.max_steps reached)."""
    try:
        yield
    except RuntimeError as err:
        lost, peer = lost_peer(err)
        if not lost or not dist.is_initialized() or dist.get_world_size() == 1:
            raise
        raise LostPeer(describe(run_dir, dist.get_rank(), where(), err, peer, finished=finished)) from None


def since_progress(watchdog) -> Callable[[], str]:
    """The position given by the hang watchdog's last progress (the step, evaluation or checkpoint
    this rank finished last); `None`: no watchdog yet (start-up)."""

    def where() -> str:
        last = watchdog.last_progress if watchdog is not None else None
        return f"after {last}" if last else "before this run's first step finished"

    return where


class LocalPeerWatch:
    """Ends this rank (the one line, exit status 1) when another rank's process on this node has
    ended and this rank has not stopped by itself `grace_s` later (`train.lost_peer_grace_s`).

    Where a rank dies before its peers have connected to it, no error comes: gloo, making a process
    group (DeepSpeed's data-parallel group, in deepspeed.initialize), waits on the rendezvous store
    for the dead rank's address for the process group's timeout (`train.startup_timeout_s` + 120 s:
    32 minutes by default), then fails with a timeout that names no rank. A thread runs meanwhile
    (the wait releases the interpreter lock) and sees the peer's process end. Ranks on other nodes,
    and those on this one in another PID namespace (`rank_processes` gives no id for them), cannot
    be watched so: their death ends this one when srun's --kill-on-bad-exit or torchrun ends the job
    step, else at that timeout."""

    def __init__(self, run_dir: str | Path, where: Callable[[], str], poll_s: float = 0.5, grace_s: float = 20.0):
        self.run_dir, self.where, self.poll_s, self.grace_s = run_dir, where, poll_s, grace_s
        self._stopped = threading.Event()
        self._thread = None

    def __enter__(self) -> LocalPeerWatch:
        if dist.is_initialized() and dist.get_world_size() > 1:
            me, here = dist.get_rank(), socket.gethostname()
            processes = rank_processes() or []
            # a peer in another PID namespace (pid None) cannot be watched: its id names no process here
            peers = [
                (r, pid) for r, (host, pid) in enumerate(processes) if host == here and r != me and pid is not None
            ]
            if peers:
                args = (me, peers, processes)
                self._thread = threading.Thread(target=self._watch, args=args, daemon=True, name="peer-watch")
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()

    def _watch(self, me: int, peers: list[tuple[int, int]], processes: list[tuple[str, int | None]]) -> None:
        while not self._stopped.wait(self.poll_s):
            if any(_has_ended(pid) for _, pid in peers):
                break
        else:
            return
        if self._stopped.wait(self.grace_s):  # this rank met the loss itself (LostPeer), or finished
            return
        where = self.where()
        waiting = f"no error, still waiting for it {self.grace_s:g} s after it ended"
        # not read from the store again: the waiting main thread holds its client
        line = describe(self.run_dir, me, where, waiting, None, processes)
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)
