"""Worker processes for the CPU-heavy part of a preparation (tokenizing), results in input order.

`ordered_map(fn, items, workers, initializer, initargs)` yields `fn(item)` for each item, in order,
computed in `workers` spawned processes with a bounded number of items in flight. It replaces
multiprocessing.Pool, which failed a preparation under Slurm in two ways (measured with
tools/prepare_data.py --workers 2 on a 44 MB JSON Lines corpus):
- a worker that dies (SIGTERM that Slurm sends to every process of the step, the kernel's
  out-of-memory killer) is replaced by the Pool without a word and the chunk it held is lost: the
  preparation waited for it forever (SIGTERM to the workers: still running 20 s later, until
  SIGKILL, its temporary folder left behind);
- `Pool.terminate` ends workers with SIGTERM, so they cannot be made to ignore it.
Here the workers ignore the stop signals (USR1, SIGTERM) and Ctrl-C's SIGINT, as the training data
loader's workers do (`pretrain.slurm.ignore_stop_signals`): the main process decides the stop and
ends them with SIGKILL on its way out. A worker that dies anyway is noticed at once (its process
sentinel) and named, with how it ended, as a DataError (WorkerDied).

The workers start with those signals blocked (`pretrain.slurm.stop_signals_blocked` around their
start; a spawned child keeps the mask) and unblock them once ignored: one that comes in the first
second or so of a worker's life (Python's start and spawn's imports) waits and is dropped. It used to
end the worker there.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import wait

from pretrain.data.errors import DataError
from pretrain.data.worker_exits import ended_by
from pretrain.slurm import HELPER_IGNORED, end_stop_immune_workers_at_exit, ignore_stop_signals, stop_signals_blocked


class WorkerDied(DataError):
    """A worker process ended while the preparation still needed it."""


def _serve(conn, fn, initializer, initargs) -> None:
    """A worker's life: take (index, item), send back (index, True, fn(item)) or (index, False,
    the error's traceback); None ends it, and so does a main process gone (its end of the pipe closed:
    SIGKILL, the out-of-memory killer), quietly: each worker printed two chained BrokenPipeError
    tracebacks there, 50 lines after a `kill -9` that read as the framework's own failure."""
    ignore_stop_signals()  # Slurm's stop signals and Ctrl-C's SIGINT, blocked since its start (ordered_map)
    if initializer is not None:
        initializer(*initargs)
    try:
        while (task := conn.recv()) is not None:
            index, item = task
            try:
                result = (index, True, fn(item))
            except Exception:
                result = (index, False, traceback.format_exc())
            conn.send(result)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # no one is left to take a result: the main process has ended


def how_it_ended(exitcode: int | None) -> str:
    """A dead worker's exit code in words, with the likely cause."""
    if exitcode is None:
        return "closed its connection and did not exit"
    if exitcode == -signal.SIGKILL:
        return f"{ended_by(exitcode)}, most often the kernel's out-of-memory killer (dmesg): use fewer --workers"
    return ended_by(exitcode) + (" (its own error is printed above)" if exitcode > 0 else "")


def ordered_map(
    fn: Callable,
    items: Iterable,
    workers: int,
    initializer: Callable | None = None,
    initargs: tuple = (),
    ahead: int | None = None,
) -> Iterator:
    """`fn(item)` for each of `items`, in their order, computed by `workers` spawned processes
    (`initializer(*initargs)` run in each first); at most `ahead` items (default 2 x workers) read
    from `items` and not yet yielded. `fn`, `initializer` and the items must pickle."""
    if workers < 1:  # with no worker the map would wait for results forever
        raise ValueError(f"ordered_map needs workers >= 1, got {workers}")
    ahead = ahead or 2 * workers
    ctx = mp.get_context("spawn")  # no fork of a parent that may hold threads
    from multiprocessing import resource_tracker

    end_stop_immune_workers_at_exit()  # they ignore SIGTERM, which multiprocessing's exit would send them
    resource_tracker.ensure_running()  # its first start, in a spawn, would unblock SIGINT and SIGTERM below
    procs, conns = [], []
    try:
        for _ in range(workers):
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(theirs, fn, initializer, initargs), daemon=True)
            with stop_signals_blocked(HELPER_IGNORED):  # the worker starts with them blocked, until it ignores them
                proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(mine)
        yield from _ordered_results(procs, conns, iter(items), ahead)
        for conn in conns:
            try:
                conn.send(None)
            except OSError:  # it died while idle: it owed nothing, and every result is in
                pass
        for proc in procs:
            proc.join(timeout=10)
    finally:  # also on an error, Ctrl-C or a stop signal raised in the main process
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        for proc in procs:
            proc.join()
        for conn in conns:
            conn.close()


def _ordered_results(procs: list, conns: list, items: Iterator, ahead: int) -> Iterator:
    idle = list(range(len(procs)))
    busy: dict[int, int] = {}  # worker -> the index of the item it holds
    done: dict[int, object] = {}  # results that came back before those of lower indexes
    sent = yielded = 0
    exhausted = False
    while True:
        while idle and not exhausted and sent - yielded < ahead:
            item = next(items, _END)
            if item is _END:
                exhausted = True
                break
            worker = idle.pop()
            try:
                conns[worker].send((sent, item))
            except OSError:  # BrokenPipeError: it died since its last result
                _died(procs[worker])
            busy[worker] = sent
            sent += 1
        if yielded in done:
            yield done.pop(yielded)
            yielded += 1
        elif exhausted and yielded == sent:
            return
        else:
            _collect(procs, conns, busy, idle, done)


_END = object()


def _collect(procs: list, conns: list, busy: dict, idle: list, done: dict) -> None:
    """Wait until a busy worker sends its result (filed in `done`) or dies (WorkerDied)."""
    by_conn = {conns[w]: w for w in busy}
    by_sentinel = {procs[w].sentinel: w for w in busy}
    ready = wait([*by_conn, *by_sentinel])
    for conn in ready:
        if conn not in by_conn:
            continue
        worker = by_conn[conn]
        try:
            index, ok, value = conn.recv()
        except (EOFError, OSError):  # it died sending
            _died(procs[worker])
        if not ok:
            raise DataError(f"a tokenizer worker failed:\n{value}")
        done[index] = value
        del busy[worker]
        idle.append(worker)
    for sentinel in ready:
        worker = by_sentinel.get(sentinel)
        if worker in busy and not conns[worker].poll():  # ended without sending the result it owes
            _died(procs[worker])


def _died(proc) -> None:
    proc.join(timeout=5)
    raise WorkerDied(f"a tokenizer worker (pid {proc.pid}) {how_it_ended(proc.exitcode)}")
