"""The end of inductor's compile-worker pool when a process that compiled exits.

torch.compile on CUDA starts a pool for Triton compilation: a sidecar process
(torch/_inductor/compile_worker/__main__.py) that forks compile workers. At exit torch
(an atexit function, `shutdown_compile_workers`) tells the sidecar to stop and waits for it
up to 300 s. Under torch 2.11 with Python 3.12 (the lent GPU machines' image) the sidecar
may never stop: when its pool of workers has been given no job yet (a process that exits
within seconds of its first CUDA compile, before the sidecar has imported torch: one failing
early, out of memory say; or, after the pool's idle quiesce of 60 s, a later compile whose
kernels are all cached), the sidecar stops its pool only at interpreter shutdown, where
Python 3.12 refuses to start the thread that would send the workers their stop signal
("RuntimeError: can't create new thread at interpreter shutdown", seen in the sidecar's
log); multiprocessing then joins the workers for ever, and the exiting process waits 300 s.
Measured here with torch 2.11's own pool: every such exit took the full wait, 300 s of a GPU
session's 15 minutes. torch 2.13 ends the workers itself.

`end_compile_workers_at_exit` (called where this project compiles with inductor) registers,
once and after torch's own exit function so that it runs first, `end_compile_workers`: ask
each sidecar to stop, give it `GRACE_S`, then kill its workers (and the sidecar if it still
waits), so the process exits in seconds whatever state the pool is in.
"""

from __future__ import annotations

import atexit
import signal
import subprocess
import sys
import threading
import time

from pretrain.process_tree import Process, kill_children

GRACE_S = 5.0  # a sidecar that stops at all does so in ~1-3 s (2 busy cores)
_registered = False


def end_compile_workers_at_exit() -> None:
    """Register `end_compile_workers` to run at exit, before torch's own pool shutdown (once)."""
    global _registered
    if _registered:
        return
    # imported first: its atexit function is then registered before ours, and so runs after it
    import torch._inductor.async_compile  # noqa: F401

    atexit.register(end_compile_workers)
    _registered = True


def end_compile_workers(grace_s: float = GRACE_S) -> None:
    """Stop every compile-worker sidecar of this process within about 2 x `grace_s`."""
    async_compile = sys.modules.get("torch._inductor.async_compile")
    if async_compile is None:
        return
    for pool in list(getattr(async_compile, "_pool_set", ())):
        sidecar = getattr(pool, "process", None)  # a SubprocPool; a ProcessPoolExecutor has none
        if isinstance(sidecar, subprocess.Popen):
            end_sidecar(pool, sidecar, grace_s)


def end_sidecar(pool, sidecar: subprocess.Popen, grace_s: float) -> None:
    """`pool.shutdown()` (torch's: tells the sidecar to stop, then waits up to 300 s), with an alarm:
    `grace_s` on, SIGKILL to the sidecar's children (the compile workers it waits for), and
    `grace_s` later to the sidecar itself; torch's wait then returns. The kills go through pidfds
    (`process_tree.Process`), so none reaches a process that got the id of a collected one. An alarm, not a thread:
    Python 3.12 starts no thread at exit. An alarm set before is set again after, with the time it had
    left. Off the main thread (no alarm there) torch's wait stands."""
    if threading.current_thread() is not threading.main_thread():
        pool.shutdown()
        return
    # opened before torch's wait, which alone collects the sidecar's exit: the alarm may come while that
    # wait has collected it and not yet recorded it (poll() then says None), and its id may be reused
    process = Process(sidecar.pid) if sidecar.poll() is None else None
    steps = [lambda: kill_children(process), process.kill] if process is not None else []

    def overdue(signum, frame):
        if sidecar.poll() is None and steps:  # poll: None, not a block, while torch's wait polls
            steps.pop(0)()
            signal.setitimer(signal.ITIMER_REAL, grace_s)

    previous = signal.signal(signal.SIGALRM, overdue)
    started = time.monotonic()
    pending, interval = signal.setitimer(signal.ITIMER_REAL, grace_s)  # the process has one such timer
    try:
        pool.shutdown()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if process is not None:
            process.close()
        if pending:  # an alarm set before: again, with the time it had left (due meanwhile: at once)
            signal.setitimer(signal.ITIMER_REAL, max(pending - (time.monotonic() - started), 1e-6), interval)
