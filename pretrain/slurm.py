"""Running inside a Slurm job: rank/world/rendezvous derived from SLURM_* variables, the
stop signal (USR1/SIGTERM) agreed on by every rank, and requeueing the job.

USR1 means "checkpoint and requeue"; SIGTERM (`scancel <job>`, the time limit itself, or
Slurm's own preemption) means "checkpoint and exit": requeue_job(stop=...) then declines, so that a
cancelled job stays cancelled, also when SIGTERM comes while the checkpoint of a USR1 stop is
written (so --signal-seconds must leave time to write one before the time limit's SIGTERM).
The trainer uses it like this:

    env = distributed_env_from_slurm()           # {} outside a Slurm task
    for key, value in env.items():
        os.environ.setdefault(key, value)         # never override torchrun's values
    stop = StopSignal()
    while step < max_steps:
        ...
        if stop.should_stop():                    # same answer on every rank, same step
            save_checkpoint(...)
            if rank == 0:
                requeue_job(stop=stop)            # last: Slurm cancels the job at once
                                                  # (no-op after SIGTERM; see stop.requeue)
            break
    stop.close()

Slurm delivers `--signal=USR1@<seconds>` (and `scancel --signal=USR1`) to every process of
the job's steps, so each rank's handler fires; a rank that misses it still stops at the
same step because the flag is all-reduced with MAX. The sbatch templates trap USR1 in the
batch shell and pass it on to the training step (`scancel --signal=USR1 --batch`), and wait
through SIGTERM, which Slurm delivers to the tasks itself.

The rendezvous port is MASTER_PORT when set (the templates choose a free one on the batch
host, or take `tools/submit.py --master-port`), else derived from the job id; rank 0 checks
that it can listen there before anything else and names the port and the override if not.
"""

from __future__ import annotations

import atexit
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# The rendezvous port lives in 10000..29999: above the well-known and common service ports,
# below Linux's ephemeral range (32768+), so it does not collide with outgoing connections.
PORT_BASE = 10000
PORT_SPAN = 20000

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# what a rank's helper processes ignore (`ignore_stop_signals`): those, and Ctrl-C's SIGINT, which reaches
# every process of the terminal's job
HELPER_IGNORED = (*STOP_SIGNALS, signal.SIGINT)

# What the ranks agree on, ordered so that MAX picks the stronger request: SIGUSR1 is the
# time-limit/preemption warning (checkpoint, requeue); any other stop signal is SIGTERM from
# `scancel` or Slurm's own preemption (checkpoint, exit: requeueing would undo the cancel).
_NONE, _REQUEUE, _EXIT = 0, 1, 2


class SlurmEnvError(RuntimeError):
    """A SLURM_* variable is missing or malformed; the message names it."""


def in_slurm_task(environ: Mapping[str, str] | None = None) -> bool:
    """True inside a task launched by srun (a job step), not in the batch shell itself."""
    environ = os.environ if environ is None else environ
    return "SLURM_JOB_ID" in environ and "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ


def master_port_for_job(job_id: int | str) -> int:
    """A rendezvous port derived from the job id: the same on every node of the job."""
    try:
        job = int(job_id)
    except ValueError:
        raise SlurmEnvError(f"SLURM_JOB_ID={job_id!r} is not an integer") from None
    return PORT_BASE + job % PORT_SPAN


def master_port_from_env(environ: Mapping[str, str]) -> int:
    """An explicit MASTER_PORT (validated), else the port derived from SLURM_JOB_ID."""
    value = environ.get("MASTER_PORT")
    if value is None or value == "":
        return master_port_for_job(environ["SLURM_JOB_ID"])
    if not value.isdigit() or not 1024 <= int(value) <= 65535:
        raise SlurmEnvError(
            f"MASTER_PORT={value!r} must be a port number in 1024..65535 "
            "(tools/submit.py --master-port, or unset it for the job-derived default)"
        )
    return int(value)


def check_port_free(port: int, host: str) -> None:
    """On the rendezvous host before the process group starts: raise SlurmEnvError naming the
    port and the override if another process (another job on the node) already listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # With SO_REUSEADDR (as the store binds) TIME_WAIT leftovers of an earlier run are no clash
        # but a listening socket is; no listen() here, so no other rank connects to this probe.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError as err:
            if err.errno != errno.EADDRINUSE:
                raise
            raise SlurmEnvError(
                f"rendezvous port {port} on {host} is already in use by another process (another job on this "
                f"node?): submit with `tools/submit.py --master-port <free port>`, or export MASTER_PORT=<free "
                f"port> before srun in your batch script"
            ) from None


_BRACKET = re.compile(r"\[([^\]]*)\]")


def first_host_python(nodelist: str) -> str:
    """First host of a Slurm hostlist expression ("gpu[003-010,012],cpu1" -> "gpu003").

    Pure-Python fallback used only where `scontrol` is not installed: it expands just the
    first entry of every bracket group, keeping zero padding.
    """
    nodelist = nodelist.strip()
    depth, end = 0, len(nodelist)
    for i, ch in enumerate(nodelist):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            end = i
            break
    first = nodelist[:end]
    if not first or depth < 0 or first.count("[") != first.count("]"):
        raise SlurmEnvError(f"SLURM_JOB_NODELIST={nodelist!r} is not a valid Slurm hostlist")

    def lowest(match: re.Match) -> str:
        item = match.group(1).split(",")[0]
        start = item.split("-")[0]
        if not start.isdigit():
            raise SlurmEnvError(f"SLURM_JOB_NODELIST={nodelist!r} is not a valid Slurm hostlist")
        return start

    return _BRACKET.sub(lowest, first)


def first_host(nodelist: str) -> str:
    """First host of a nodelist, expanded by `scontrol show hostnames` (Slurm's own parser)."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return first_host_python(nodelist)
    result = subprocess.run(
        [scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60, check=False
    )
    hosts = result.stdout.split()
    if result.returncode != 0 or not hosts:
        # scontrol needs a readable slurm.conf; the job must still start without one.
        host = first_host_python(nodelist)
        print(
            f"`scontrol show hostnames {nodelist}` failed (exit {result.returncode}: {result.stderr.strip()}); "
            f"using {host} from the node list itself",
            file=sys.stderr,
            flush=True,
        )
        return host
    return hosts[0]


def _int_var(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None:
        raise SlurmEnvError(f"{name} is not set inside the Slurm task (launch the trainer with srun)")
    try:
        return int(value)
    except ValueError:
        raise SlurmEnvError(f"{name}={value!r} is not an integer") from None


def distributed_env_from_slurm(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT for a task launched by srun.

    Returns {} outside a Slurm task (no SLURM_JOB_ID/SLURM_STEP_ID), including the batch
    shell itself, where a plain `python -m pretrain.train` is a single process.
    """
    environ = os.environ if environ is None else environ
    if not in_slurm_task(environ):
        return {}
    rank = _int_var(environ, "SLURM_PROCID")
    local_rank = _int_var(environ, "SLURM_LOCALID")
    # srun sets SLURM_STEP_NUM_TASKS for the step; SLURM_NTASKS may describe the allocation.
    world_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ else "SLURM_NTASKS"
    world_size = _int_var(environ, world_var)
    if not 0 <= rank < world_size:
        raise SlurmEnvError(f"SLURM_PROCID={rank} is outside 0..{world_var}-1={world_size - 1}")
    if local_rank < 0 or local_rank > rank:
        raise SlurmEnvError(f"SLURM_LOCALID={local_rank} must be in 0..SLURM_PROCID={rank}")
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set inside the Slurm task")
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": first_host(nodelist),
        "MASTER_PORT": str(master_port_from_env(environ)),
    }


# A SIGINT this soon after the first is the same press: torchrun passes the terminal's SIGINT on to its
# ranks, which the terminal reached already (seen: the two arrive within milliseconds, or merge).
CTRL_C_SAME_PRESS_S = 1.0
CTRL_C_NOTE = (
    b"Ctrl-C: stopping after this step with a checkpoint, as SIGTERM does; Ctrl-C again to abort at once "
    b"(the steps since the last checkpoint are then lost)\n"
)
CTRL_C_ABORTED = "error: aborted by a second Ctrl-C: the steps since the run's last checkpoint are lost"


def first_on_its_node(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is its node's local rank 0 (LOCAL_RANK from torchrun, SLURM_LOCALID in an
    srun task; a process started alone is): the one that speaks for the node's ranks about a Ctrl-C,
    which the terminal sends to every one of them. Read at the start, before pretrain.distributed
    points LOCAL_RANK at a GPU index (0 in every task that sees one GPU)."""
    environ = os.environ if environ is None else environ
    local = environ.get("LOCAL_RANK")
    if local is None and in_slurm_task(environ):
        local = environ.get("SLURM_LOCALID")
    return local in (None, "0")


@contextmanager
def ctrl_c_abort_in_one_line(resume: str) -> Iterator[None]:
    """Around a run whose `StopSignal(ctrl_c=True)` aborts on a second Ctrl-C (KeyboardInterrupt from
    wherever the run is): that KeyboardInterrupt, leaving the block, is reported in one line,
    CTRL_C_ABORTED and `resume` (how to go on), not a traceback, by the node's local rank 0 only (the
    others end without a word, as they took the first press). Python still ends the process as on
    any Ctrl-C: its exit functions, then killed by SIGINT (which tells a shell script running the
    command to stop too). Left otherwise, the previous sys.excepthook is put back."""
    report = sys.excepthook
    speaks = first_on_its_node()

    def hook(kind, value, tb):
        if issubclass(kind, KeyboardInterrupt):
            if speaks:  # the node's other ranks end silently, by the same SIGINT
                print(f"{CTRL_C_ABORTED}; {resume}", file=sys.stderr, flush=True)
        else:
            report(kind, value, tb)

    sys.excepthook = hook
    try:
        yield
    except KeyboardInterrupt:
        raise  # the hook reports it, as the process ends
    except BaseException:
        sys.excepthook = report
        raise
    sys.excepthook = report


class StopSignal:
    """A flag set by SIGUSR1/SIGTERM, agreed on by all ranks at a step boundary.

    The handler only sets the flag (no locks; one write(2) for Ctrl-C), and calls a previously
    installed Python handler after it. `close()` restores the previous handlers. Must be created in
    the main thread (Python delivers signals there only).

    `ctrl_c` (the training command line, the demo): the first SIGINT stops as SIGTERM does (a
    checkpoint, no requeue), saying so on stderr; a second, a second or more later, raises KeyboardInterrupt
    at once (one sooner is the same press, passed on by torchrun). Only the node's local rank 0 says
    so (`first_on_its_node`): the terminal's press reaches every rank, which said it once each. Only where
    SIGINT has Python's default handler: a shell's background job, which ignores it, keeps ignoring it.
    """

    def __init__(self, signals=STOP_SIGNALS, group=None, check_every: int = 1, ctrl_c: bool = False):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("StopSignal() must be created in the main thread (signal handlers live there)")
        if check_every < 1:
            raise ValueError(f"check_every={check_every} must be >= 1")
        self.group = group
        self.check_every = check_every
        self.received: int | None = None  # number of the first stop signal received locally
        self._local_kind = _NONE
        self._agreed = _NONE  # what the ranks agreed on at the last check: the state requeue_job reads
        self._calls = 0
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._ctrl_c_pressed: float | None = None  # time.monotonic() of the first
        self._ctrl_c_note = CTRL_C_NOTE if first_on_its_node() else b""
        if (
            ctrl_c
            and signal.SIGINT not in self._previous
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._handle_ctrl_c)

    def _handle_ctrl_c(self, signum, frame):
        now = time.monotonic()
        if self._ctrl_c_pressed is not None:
            if now - self._ctrl_c_pressed >= CTRL_C_SAME_PRESS_S:
                raise KeyboardInterrupt
            return
        self._ctrl_c_pressed = now
        if self._ctrl_c_note:
            try:
                os.write(2, self._ctrl_c_note)
            except OSError:
                pass
        if self.received is None:
            self.received = signum
        self._local_kind = max(self._local_kind, _EXIT)

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
        self._local_kind = max(self._local_kind, _REQUEUE if signum == signal.SIGUSR1 else _EXIT)
        previous = self._previous.get(signum)
        if callable(previous):
            previous(signum, frame)

    @property
    def local_flag(self) -> bool:
        return self.received is not None

    def should_stop(self) -> bool:
        """Call at the same points on every rank (once per step; before each evaluation forward);
        True on all ranks at the same call once any rank received a stop signal. Collective when
        torch.distributed is initialised."""
        if self._agreed:
            return True
        self._calls += 1
        if self._calls % self.check_every:
            return False
        kind = self._local_kind
        dist = _initialised_dist()
        if dist is not None:
            import torch

            device = "cpu"
            if dist.get_backend(self.group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            t = torch.tensor([kind], dtype=torch.int32, device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
            kind = int(t.item())
        self._agreed = kind
        return bool(kind)

    @property
    def requeue(self) -> bool:
        """After should_stop() returned True: whether the job should be requeued (the ranks
        agreed on USR1, and none received SIGTERM, nor this rank since)."""
        return self._agreed == _REQUEUE and not self.cancelled

    @property
    def cancelled(self) -> bool:
        """After should_stop() returned True: some rank received SIGTERM (scancel or Slurm's own
        preemption) before the ranks agreed, or this rank received it since (a scancel while the
        checkpoint of an agreed USR1 stop is written), so the job must not be requeued."""
        return self._agreed == _EXIT or self._local_kind == _EXIT

    def close(self) -> None:
        """Restore the handlers that were installed before (idempotent)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ignore_stop_signals(_worker_id: int | None = None) -> None:
    """In a helper process of a rank (a data-loader worker: `worker_init_fn`): ignore USR1 and SIGTERM,
    and Ctrl-C's SIGINT (the rank's Ctrl-C handler, inherited, said it would stop once per worker).

    Slurm sends them to every process of the job step (`scancel`, the time limit, preemption), the
    helpers too; a data-loader worker died of SIGTERM (torch's own handler), and its rank raised
    "DataLoader worker ... is killed by signal" at its next step, before the checkpoint the signal
    asks for. The rank decides the stop and ends its helpers.
    A helper started inside `stop_signals_blocked` has them blocked until here: one that came before
    waited, and is discarded as they become ignored.
    """
    for sig in HELPER_IGNORED:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELPER_IGNORED)


@contextmanager
def stop_signals_blocked(signals=STOP_SIGNALS) -> Iterator[None]:
    """Around the fork of helper processes whose first act is `ignore_stop_signals`: this thread blocks
    USR1 and SIGTERM, so that the helpers start with them blocked; a signal to this process meanwhile is
    delivered when the block ends (or at once to another of its threads).

    Without it, a stop signal between a data-loader worker's fork and its worker_init_fn met torch's
    worker handler: SIGTERM from the parent ended the worker with status 0, from anyone else (Slurm)
    killed it, and USR1 killed it where the parent had no handler; the rank then failed with
    "DataLoader worker ... exited" instead of checkpointing. Forked children inherit the mask; spawned
    ones too, unless multiprocessing starts its resource tracker in between (it unblocks SIGINT and
    SIGTERM after: start it first, `multiprocessing.resource_tracker.ensure_running()`). `signals`: those
    to block, if not these two."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


_workers_ended_at_exit = False


def end_stop_immune_workers_at_exit() -> None:
    """In the process that starts workers given `ignore_stop_signals`: register, once, the end of
    those still running when it exits.

    multiprocessing ends a process's daemonic children at exit with SIGTERM and then joins them;
    a worker ignoring SIGTERM was joined forever (a loader iterator still referenced at exit: the
    test suite's pytest never returned after its summary, and a rank ended by an error would stay
    in the job). Registered after multiprocessing's own exit function, this one runs first and
    ends them with SIGKILL, which they cannot ignore."""
    global _workers_ended_at_exit
    if not _workers_ended_at_exit:
        atexit.register(_kill_daemonic_children)
        _workers_ended_at_exit = True


def _kill_daemonic_children() -> None:
    import multiprocessing

    # what multiprocessing's exit would terminate; a data-loader worker is one
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    # torch's SIGCHLD handler (where installed) would raise 'DataLoader worker ... killed' inside a join
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


def _initialised_dist():
    if "torch" not in sys.modules:
        return None
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _job_rank() -> int:
    dist = _initialised_dist()
    if dist is not None:
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def requeue_job(environ: Mapping[str, str] | None = None, *, stop: StopSignal | None) -> bool:
    """Requeue this Slurm job (`scontrol requeue <id>`) from rank 0; True if it was requeued.

    Outside Slurm, or on any other rank, it does nothing and returns False. It also declines
    when `stop` (the run's StopSignal) agreed on SIGTERM, or this rank received SIGTERM after
    the ranks agreed on USR1 (`stop.cancelled`): the job was cancelled (`scancel`) or preempted
    by Slurm itself, and a requeue would bring back a job its owner cancelled.
    `stop` is required so that no caller forgets it: None only for a requeue no signal decided.
    Slurm cancels the running job as soon as the requeue is accepted, so call this after the
    checkpoint is complete and everything else is flushed.
    """
    environ = os.environ if environ is None else environ
    job_id = environ.get("SLURM_JOB_ID")
    if not job_id or _job_rank() != 0:
        return False
    if stop is not None and stop.cancelled:
        print(
            f"not requeueing Slurm job {job_id}: stopped by SIGTERM (scancel or Slurm preemption)",
            file=sys.stderr,
            flush=True,
        )
        return False
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        job_id = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        print(f"requeue of job {job_id} skipped: scontrol is not on PATH", file=sys.stderr, flush=True)
        return False
    print(f"requeueing Slurm job {job_id}", file=sys.stderr, flush=True)
    result = subprocess.run([scontrol, "requeue", job_id], capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        print(
            f"`scontrol requeue {job_id}` failed (exit {result.returncode}): {result.stderr.strip()} "
            "(was the job submitted with --requeue?)",
            file=sys.stderr,
            flush=True,
        )
        return False
    return True
