"""A data loader that fails on one rank in the middle of training otherwise than with a DataError (a
worker killed by the kernel's out-of-memory killer, a shard its node cannot read) stops every rank
within seconds, naming it. The failing rank raised a RuntimeError alone, and the others waited for it
in the step's all-reduce until the hang watchdog fired (measured: rank 0 still waiting when the test
harness gave up, 37 s after rank 1 had left): torch's SIGCHLD handler raised the dead worker's error
wherever rank 1's main thread was (measured: in the slot statistics' all-reduce), and where it was in
the data wait, nothing told the others. Ranks as in test_one_rank_faults.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.train.helpers import rank_results, tiny_config


def _worker_killed_on_rank_1(rank: int, run: str, cache: str) -> dict:
    """Rank 1's loader worker is killed (SIGKILL, as the OOM killer does) by a timer, wherever the
    main thread then is: most often in the step's compute or a collective, not in the data wait."""
    import multiprocessing
    import os
    import signal
    import threading

    from pretrain import train as train_module
    from pretrain import trainer as trainer_module

    real = trainer_module.Trainer.next_batch

    def arming(self, batches):
        if rank == 1 and self.state.step == 2 and not getattr(self, "armed", False):
            self.armed = True
            workers = [child.pid for child in multiprocessing.active_children()]  # the DataLoader's
            threading.Timer(1.0, lambda: [os.kill(pid, signal.SIGKILL) for pid in workers]).start()
        return real(self, batches)

    trainer_module.Trainer.next_batch = arming
    try:
        train_module.train(tiny_config(Path(run), Path(cache), "train.max_steps=400", "data.num_workers=1"))
        return {"error": None}
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err), "raised_at": time.time()}


def test_a_loader_worker_killed_on_one_rank_stops_every_rank_naming_it(tmp_path, data_cache):
    got = rank_results(2, _worker_killed_on_rank_1, (str(tmp_path / "run"), str(data_cache)), tmp_path, 120)
    # torch's own words vary with where the worker died: "exited unexpectedly", or the queue's
    # "Connection reset by peer" where it died mid-send
    refusal = r"the training data loader failed at step \d+: .+"
    import re

    assert got[0]["error"] == got[1]["error"] == "DataError"
    assert re.match(refusal, got[1]["message"]), got[1]["message"]
    assert re.match(r"rank 1 on \S+: ", got[0]["message"]) and got[0]["message"].endswith(f": {got[1]['message']}")
    assert abs(got[0]["raised_at"] - got[1]["raised_at"]) < 20


def _validation_read_fails_on_rank_1(rank: int, run: str, cache: str, failure: str) -> dict:
    """Rank 1's validation loader fails after its first batch, in the evaluation after step 1: an
    OSError (a shard its node cannot read: a stale network-filesystem handle) or a DataError (a
    corrupt shard under data.on_corrupt=error)."""
    import errno

    from pretrain import train as train_module
    from pretrain.build import build_loader
    from pretrain.data.errors import DataError

    class FailingAfterFirstBatch:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            for i, batch in enumerate(self.loader):
                if i == 1:
                    if failure == "OSError":
                        raise OSError(errno.ESTALE, "Stale file handle", "val/shard_00000.bin")
                    raise DataError("shard val/shard_00000.bin is corrupt: re-create the dataset")
                yield batch

    def loaders(cfg, where, split, *args, **kwargs):
        loader = build_loader(cfg, where, split, *args, **kwargs)
        return FailingAfterFirstBatch(loader) if rank == 1 and split == "val" else loader

    cfg = tiny_config(Path(run), Path(cache), "train.max_steps=3", "train.eval_every=1", "train.eval_batches=8")
    try:
        train_module.train(cfg, loaders=loaders)
        return {"error": None}
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err), "raised_at": time.time()}


@pytest.mark.parametrize(
    "failure, message",
    [
        ("OSError", r"the evaluation data loader failed \(source \S+, split val\): \[Errno 116\] Stale file handle"),
        ("DataError", r"shard val/shard_00000.bin is corrupt"),
    ],
    ids=["OSError", "DataError"],
)
def test_a_validation_loader_failing_on_one_rank_stops_every_rank_naming_it(tmp_path, data_cache, failure, message):
    """It ended rank 1 alone, rank 0 left waiting in the evaluation's next all-reduce (measured:
    still waiting when the harness gave up, 60 s later). The validation loader has no workers
    (data.num_workers is the training loader's): a dead worker cannot happen there."""
    import re

    args = (str(tmp_path / "run"), str(data_cache), failure)
    got = rank_results(2, _validation_read_fails_on_rank_1, args, tmp_path, 60)
    assert got[0]["error"] == got[1]["error"] == "DataError", got
    assert re.match(message, got[1]["message"]), got[1]
    assert re.match(r"rank 1 on \S+: ", got[0]["message"]) and got[0]["message"].endswith(f": {got[1]['message']}")
    assert abs(got[0]["raised_at"] - got[1]["raised_at"]) < 20


class _Endless(torch.utils.data.IterableDataset):
    def __iter__(self):
        while True:
            yield torch.zeros(4)


def _received_from_a_worker(error: BaseException) -> BaseException:
    """`error` as torch's DataLoader raises it where receiving a worker's batch fails with it (its
    own `_try_get_data`, the worker alive): the raw error of a batch cut off mid-send."""

    def failing(timeout=None):
        raise error

    batches = iter(torch.utils.data.DataLoader(_Endless(), batch_size=None, num_workers=1))
    try:
        batches._data_queue.get = failing
        next(batches)
    except BaseException as raised:
        return raised
    finally:
        batches._shutdown_workers()
    raise AssertionError("no error")


OOM = "most often the kernel's out-of-memory killer"


@pytest.mark.parametrize(
    "error, hint",
    [
        # torch 2.11 and 2.13 alike (dataloader.py's wait for a batch; C++ SIGCHLD handler)
        (lambda: RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly"), OOM),
        (lambda: RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed. "), OOM),
        (
            lambda: RuntimeError(
                "DataLoader worker (pid 4242) is killed by signal: Bus error. It is possible that dataloader's "
                "workers are out of shared memory. Please try to raise your shared memory limit."
            ),
            "the workers ran out of shared memory (/dev/shm)",
        ),
        (
            lambda: RuntimeError(
                "DataLoader worker (pid 4242) exited unexpectedly with exit code 1. Details are lost due to "
                "multiprocessing. Rerunning with num_workers=0 may give better error trace."
            ),
            None,
        ),
        (lambda: _received_from_a_worker(EOFError()), f"a DataLoader worker died while sending a batch: {OOM}"),
        (
            lambda: _received_from_a_worker(ConnectionResetError(104, "Connection reset by peer")),
            f"a DataLoader worker died while sending a batch: {OOM}",
        ),
        (lambda: ConnectionResetError(104, "Connection reset by peer"), None),  # not from a DataLoader
        (lambda: OSError(116, "Stale file handle"), None),
        (lambda: RuntimeError("Too many open files. Communication with the workers is no longer possible."), None),
    ],
    ids=["exited", "killed", "bus-error", "exit-code", "eof-mid-send", "reset-mid-send", "reset", "stale", "fds"],
)
def test_a_dead_workers_error_is_shared_with_what_most_often_killed_it(error, hint):
    """The hint came only with "killed by signal" and "exited unexpectedly"; a worker killed while
    sending a batch raised EOFError (6 in 30 random SIGKILLs here), which the training loop did not
    catch at all (its rank alone ended, the others waited), or ConnectionResetError (4 in 30), shared
    without a hint; a full /dev/shm (Bus error) got the OOM killer's."""
    from pretrain.data.errors import DataError
    from pretrain.data.loader_failures import read_all

    raised = error()

    class Failing:
        def __iter__(self):
            yield "a batch"
            raise raised

    with pytest.raises(DataError) as refused:
        read_all(Failing(), "the training data loader failed at step 3")
    message = str(refused.value)
    assert message.startswith(f"the training data loader failed at step 3: {str(raised).strip() or 'EOFError'}")
    assert refused.value.__cause__ is raised
    if hint is None:
        assert "; " not in message.removeprefix("the training data loader failed at step 3: "), message
    else:
        assert f"; {hint}" in message, message


def test_a_corrupt_shard_read_by_a_worker_is_refused_in_its_own_words(tmp_path, data_cache):
    """A loader worker's DataError (a corrupt shard under data.on_corrupt=error) reached the main
    process, and every rank, as torch re-raises it: "Caught CorruptShardError in DataLoader worker
    process 0.\\nOriginal Traceback (most recent call last): ..." as its message. It now says what
    the loader without workers says (the reference)."""
    import re
    import shutil

    from pretrain.data import ShardLoader
    from pretrain.data.shards import CorruptShardError, read_manifest

    source = next(p.parent for p in data_cache.rglob("manifest.json") if (p.parent / "train").is_dir())
    data = tmp_path / "data"
    shutil.copytree(source, data)
    shard = data / read_manifest(data)["splits"]["train"]["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2 + 100])

    def refusal(workers: int) -> str:
        with pytest.raises(CorruptShardError) as refused:
            list(ShardLoader(data, "train", batch_size=2, seed=0, loop=False, num_workers=workers))
        return re.sub(r"0x[0-9a-f]+", "0x", str(refused.value))  # an object's address in the reader's words

    expected = refusal(0)
    assert expected.startswith(f"corrupt shard {shard} at byte offset ")
    assert refusal(1) == expected


def _read_with_a_worker_that_ends(data: str, how: str, answer) -> None:
    """In a fresh (spawned) process, as a rank reads: its loader's only worker ends itself `how`
    after two batches; `answer` gets the DataError's message."""
    import multiprocessing
    import os
    import signal
    import sys

    from pretrain.data import ShardLoader
    from pretrain.data.loader_failures import read_all
    from pretrain.trainer import leave_dead_workers_to_the_loader

    real = ShardLoader._stream
    ends = {
        "SIGKILL": lambda: os.kill(os.getpid(), signal.SIGKILL),  # what the OOM killer sends
        "SIGSEGV": lambda: os.kill(os.getpid(), signal.SIGSEGV),
        "os._exit(3)": lambda: os._exit(3),
        "sys.exit(3)": lambda: sys.exit(3),
    }

    def stream(self, *args):
        for n, batch in enumerate(real(self, *args)):
            if n == 2:
                ends[how]()
            yield batch

    multiprocessing.set_start_method("fork", force=True)  # a rank's default (a spawned process has spawn's)
    ShardLoader._stream = stream  # the forked worker runs this
    leave_dead_workers_to_the_loader()  # as the trainer does
    try:
        read_all(ShardLoader(data, "train", batch_size=2, num_workers=1, loop=False), "the loader failed")
        answer.put(None)
    except Exception as err:
        answer.put(str(err))


@pytest.mark.parametrize(
    "how, said",
    [
        ("SIGKILL", f"was killed by SIGKILL; {OOM}"),
        ("SIGSEGV", "was killed by SIGSEGV; it crashed in native code"),
        ("os._exit(3)", "exited by itself with status 3; not the out-of-memory killer: the data code ended it"),
        ("sys.exit(3)", "exited by itself with status 3; not the out-of-memory killer: the data code ended it"),
    ],
)
def test_a_dead_worker_is_told_apart_by_how_it_ended(data_cache, how, said):
    """Every worker death got the out-of-memory killer's hint, or none: torch says "DataLoader worker
    (pid(s) N) exited unexpectedly" for a kill and a worker's own os._exit(3) alike, "Connection reset
    by peer" where a SIGKILL or SIGSEGV cut off a batch, and "[Errno 2] No such file or directory"
    where sys.exit(3) ended a worker whose batch was still being handed over (measured). The loader now
    reads the worker's exit code; the reference is how the test ended it."""
    import multiprocessing
    import re

    source = next(p.parent for p in data_cache.rglob("manifest.json") if (p.parent / "train").is_dir())
    context = multiprocessing.get_context("spawn")
    answer = context.Queue()
    reader = context.Process(target=_read_with_a_worker_that_ends, args=(str(source), how, answer))
    reader.start()
    message = answer.get(timeout=120)
    reader.join(timeout=60)
    assert re.match(rf"the loader failed: DataLoader worker \(pid \d+\) {re.escape(said)}", message or ""), message


class _RaisingDataset(torch.utils.data.IterableDataset):
    """One batch, then an error of the data code itself (not a DataError, which the loader sends as an item)."""

    def __iter__(self):
        yield torch.zeros(1)
        raise RuntimeError("a bug in the data code")


def test_a_workers_own_error_is_raised_at_once_not_taken_for_its_death(monkeypatch):
    """torch re-raises an error of a worker's own code as "Caught RuntimeError in DataLoader worker
    process 0": ended_worker took those words for a death and polled the worker processes for 2 s for an
    exit that never came (measured: 2.02 s) before the error went on. Only torch's words for a death
    ("DataLoader worker (pid(s) N) ...") now send it looking; the reference is that it never waits."""
    from torch.utils.data import DataLoader

    from pretrain.data import worker_exits
    from pretrain.data.loader_failures import naming_dead_workers

    class NoWaiting:
        monotonic = staticmethod(time.monotonic)

        @staticmethod
        def sleep(seconds):
            raise AssertionError(f"waited {seconds} s for a worker to end")

    loader = iter(DataLoader(_RaisingDataset(), batch_size=None, num_workers=1))
    batches = naming_dead_workers(loader)
    try:
        assert torch.equal(next(batches), torch.zeros(1))
        monkeypatch.setattr(worker_exits, "time", NoWaiting)
        with pytest.raises(RuntimeError, match="Caught RuntimeError in DataLoader worker process 0") as raised:
            next(batches)
        assert "a bug in the data code" in str(raised.value)
    finally:
        loader._shutdown_workers()  # not left to the collector: the next test's processes are its own
