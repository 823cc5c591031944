"""How a worker process ended, read from its exit code, and what most likely ended it.

A process killed by a signal has a negative exit code (-9: SIGKILL, what the kernel's
out-of-memory killer sends); one that ended itself (sys.exit, os._exit, an error at its top level)
a code of 0 or more. torch's DataLoader says neither: "DataLoader worker (pid(s) N) exited
unexpectedly", or where the worker died with a batch on its way, the queue's own error
("Connection reset by peer", EOFError, or FileNotFoundError from the shared-memory handover).
`ended_worker` reads the code from the DataLoader's worker processes where such an error came, so
that a worker that exited by itself is not sent to look for the out-of-memory killer.
"""

from __future__ import annotations

import signal
import time

OUT_OF_MEMORY_HINT = (
    "most often the kernel's out-of-memory killer (dmesg): fewer data.num_workers or a smaller "
    "data.shuffle_buffer need less memory"
)
SHARED_MEMORY_HINT = (
    "the workers ran out of shared memory (/dev/shm): a larger limit (docker run --shm-size) or fewer data.num_workers"
)
_CRASH_SIGNALS = (signal.SIGSEGV, signal.SIGABRT, signal.SIGILL, signal.SIGFPE)
_SEE_IT_ALONE = (
    "what it printed is above on this rank's stderr; data.num_workers=0 reads in the main process, where the "
    "fault shows with its stack"
)


def ended_by(exitcode: int) -> str:
    """'was killed by SIGKILL', 'exited by itself with status 3'."""
    if exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited by itself with status {exitcode}"


def worker_exit_hint(exitcode: int) -> str:
    """What most likely ended a DataLoader worker that ended with `exitcode`, and what to do."""
    if exitcode == -signal.SIGKILL:
        return OUT_OF_MEMORY_HINT
    if exitcode == -signal.SIGBUS:
        return SHARED_MEMORY_HINT
    if exitcode < 0 and -exitcode in _CRASH_SIGNALS:
        return f"it crashed in native code (numpy, torch, a decompressor); {_SEE_IT_ALONE}"
    if exitcode < 0:
        return "not the out-of-memory killer (it sends SIGKILL): another process on the node sent the signal"
    return f"not the out-of-memory killer: the data code ended it (sys.exit or os._exit); {_SEE_IT_ALONE}"


class WorkerEnded(RuntimeError):
    """A DataLoader worker is gone; `exitcode` as its process reported it (negative: the signal).
    The DataLoader's own error is its cause."""

    def __init__(self, pid: int, exitcode: int):
        self.pid, self.exitcode = pid, exitcode
        super().__init__(f"DataLoader worker (pid {pid}) {ended_by(exitcode)}")

    @property
    def hint(self) -> str:
        return worker_exit_hint(self.exitcode)


def raised_receiving_from_workers(err: BaseException) -> bool:
    """Raised in torch's DataLoader while it received a worker's batch (`_try_get_data`, torch 2.x):
    a worker killed in the middle of sending one surfaces there as EOFError or ConnectionResetError,
    not as torch's own words (measured, worker SIGKILLed at random moments: 6 and 4 in 30)."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_try_get_data":
            return True
        tb = tb.tb_next
    return False


def ended_worker(iterator, err: BaseException, wait_s: float = 2.0) -> WorkerEnded | None:
    """The worker of the DataLoader `iterator` that has ended, where `err` (raised by it) may be
    its death: torch's "DataLoader worker" words, or an error met receiving a batch. Waits up to
    `wait_s` for the kernel to report the exit (a worker cut off mid-send may still be ending);
    None where no worker ended, or `err` is of another kind (a worker's own exception, re-raised)."""
    # torch's words for a death, "DataLoader worker (pid(s) N) ...", not those it re-raises a worker's
    # own error with, "Caught RuntimeError in DataLoader worker process 0" (no worker ends for that)
    if "DataLoader worker (pid" not in str(err) and not raised_receiving_from_workers(err):
        return None
    workers = getattr(iterator, "_workers", None) or []  # torch's worker processes (a private name)
    deadline = time.monotonic() + wait_s
    while True:
        ended = [w for w in workers if not w.is_alive() and w.exitcode is not None]
        if ended:
            worst = min(ended, key=lambda w: (w.exitcode == 0, w.exitcode))  # a signal or an error first
            return WorkerEnded(worst.pid, worst.exitcode)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)
