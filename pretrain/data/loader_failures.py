"""What a loader's failure on one rank becomes: the errors a loader raises besides a DataError
(an unreadable shard, a dead DataLoader worker), what most likely ended a dead worker, and the
DataError that every rank is told of, so that the others do not wait in their next collective."""

from __future__ import annotations

from typing import Iterator

from pretrain.data.errors import DataError
from pretrain.data.worker_exits import (
    OUT_OF_MEMORY_HINT,
    SHARED_MEMORY_HINT,
    WorkerEnded,
    ended_worker,
    raised_receiving_from_workers,
)

# what a loader raises, besides a DataError, when it fails on one rank: a shard its node cannot read
# (OSError: a stale network-filesystem handle), a dead DataLoader worker (RuntimeError; EOFError or
# ConnectionResetError where it died in the middle of sending a batch)
LOADER_FAILURES = (OSError, RuntimeError, EOFError)


def dead_worker_hint(err: BaseException) -> str | None:
    """What most likely ended the DataLoader worker whose death `err` reports, or None where `err`
    is not a dead worker's. A WorkerEnded (the worker's exit code, read by the loader) says it
    exactly; torch's words are a guess: "DataLoader worker (pid(s) N) exited unexpectedly", "... is
    killed by signal: Killed." (its SIGCHLD handler, where installed; ": Bus error." for a full
    /dev/shm), or the raw EOFError or ConnectionResetError of a batch cut off mid-send. "exited
    unexpectedly with exit code N" (the worker ended itself) is not the OOM killer's doing."""
    if isinstance(err, WorkerEnded):
        return err.hint
    text = str(err)
    if "DataLoader worker" in text and "Bus error" in text:
        return SHARED_MEMORY_HINT
    if "DataLoader worker" in text and ("killed by signal" in text or text.rstrip().endswith("exited unexpectedly")):
        return OUT_OF_MEMORY_HINT
    if isinstance(err, (EOFError, ConnectionError)) and raised_receiving_from_workers(err):
        return f"a DataLoader worker died while sending a batch: {OUT_OF_MEMORY_HINT}"
    return None


def loader_failure(err: BaseException, what: str) -> DataError:
    """`err`, one of LOADER_FAILURES, as the DataError that every rank is told of ("`what`: its
    message", with `dead_worker_hint`), `err` as its cause: raised on the failing rank alone, it
    left the others waiting in their next collective."""
    message = str(err).strip() or type(err).__name__  # an EOFError has no words
    hint = dead_worker_hint(err)
    failure = DataError(f"{what}: {message}" + (f"; {hint}" if hint else ""))
    failure.__cause__ = err  # its traceback, on this rank
    return failure


def read_all(loader, what: str) -> list:
    """Every batch of `loader` (loop=False), its failures of LOADER_FAILURES as `loader_failure`'s
    DataError: to be shared with the other ranks (`refusal_shared`)."""
    try:
        return list(loader)
    except LOADER_FAILURES as err:
        raise loader_failure(err, what) from err


def naming_dead_workers(batches) -> Iterator[dict]:
    """The DataLoader iterator `batches`' items; torch's error for a worker that died, re-raised as
    a WorkerEnded carrying its exit code (torch's error its cause)."""
    while True:
        try:
            item = next(batches)
        except StopIteration:
            return
        except LOADER_FAILURES as err:
            ended = ended_worker(batches, err)
            if ended is None:
                raise
            raise ended from err
        yield item
