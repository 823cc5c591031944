"""Run a function on W local gloo ranks (127.0.0.1), for tests and CPU benchmarks.

A failed run raises `RankFailed`, one line naming the rank that failed first and its error (its
traceback as a note). torch.multiprocessing's own report names whichever process it joined
first, often a survivor with gloo's `Connection closed by peer` while the rank that raised was
never named: each rank here records its error, and the error that is not a lost peer is the cause.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import tempfile
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp

from pretrain.distributed import free_port

# What the fork server imports once for every rank it forks (each spawned rank took ~3 s of CPU
# importing them, most of a small test's time; torch._dynamo, which building a model imports,
# another 2-5 s; DeepSpeed's Muon optimizer, which deepspeed.initialize imports under ZeRO 1-3 to
# list it as supported, and with it inductor's compile_fx, 1-2.5 s more), and the variables those
# imports read.
_PRELOAD = [
    "torch",
    "deepspeed",
    "pretrain.train",
    "torch._dynamo",
    "torch.utils.tensorboard",
    "deepspeed.runtime.zero.muon.muon_optimizer",
]
_IMPORT_TIME_ENV = ("DS_ACCELERATOR", "TRITON_INTERPRET")  # DeepSpeed fixes its accelerator on import
SURVIVOR_GRACE_S = 5.0  # how long the other ranks of a failed one have to end by themselves
_server_env: list[tuple] = []  # _IMPORT_TIME_ENV's values when this process's fork server started


def _start_method() -> str:
    """'forkserver' while the import-time variables are those the fork server imported under,
    else 'spawn' (a fresh interpreter that imports under the caller's)."""
    current = tuple(os.environ.get(k) for k in _IMPORT_TIME_ENV)
    if current[0] is None:  # the rank sets cpu before it imports DeepSpeed; the server's import would guess
        return "spawn"
    if not _server_env:
        _server_env.append(current)
        multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)
    return "forkserver" if _server_env[0] == current else "spawn"


class RankFailed(RuntimeError):
    """A rank of `run_gloo` raised or was killed; the message names it and its error in one line."""


def _report_error(report_dir: str, rank: int, err: Exception) -> None:
    from pretrain.lost_peer import lost_peer

    lines = str(err).strip().splitlines()
    record = {
        "error": f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__,
        "lost_peer": lost_peer(err)[0],
        "traceback": traceback.format_exc(),
        "at": time.monotonic(),  # one clock for every process on the machine
    }
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(record))


def rank_context():
    """The multiprocessing context `run_gloo` starts its ranks in, for callers that start their own
    processes: the fork server's (a child has the server's environment: pass the caller's and apply
    it first, as `_entry` does), else spawn's."""
    return multiprocessing.get_context(_start_method())


def _entry(
    rank: int,
    fn,
    world_size: int,
    port: int,
    deepspeed_comm: bool,
    args: tuple,
    environ: dict | None = None,
    report_dir: str | None = None,
) -> None:
    try:
        _run_rank(rank, fn, world_size, port, deepspeed_comm, args, environ)
    except Exception as err:
        if report_dir is not None:
            _report_error(report_dir, rank, err)
        raise


def _run_rank(rank: int, fn, world_size: int, port: int, deepspeed_comm: bool, args: tuple, environ) -> None:
    if environ is not None:  # a forked rank has the fork server's environment: take the caller's
        os.environ.clear()
        os.environ.update(environ)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if deepspeed_comm:
        import deepspeed

        from kernels.deepspeed_ops import share_deepspeed_op_builds

        share_deepspeed_op_builds()  # its CPU comm op: one build for every checkout, not one per switch

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def _failure(world_size: int, report_dir: str, processes) -> RankFailed | None:
    """The cause of a failed run: the rank whose error came first of those that are not a lost peer,
    else the first killed without a Python error (by a signal other than the SIGTERM torch sends the survivors),
    else the first that lost its peer."""
    reports = {}
    for rank in range(world_size):
        path = Path(report_dir, f"rank{rank}.json")
        try:
            reports[rank] = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            # none, or one cut short: torch's SIGTERM ended a survivor while it wrote its report
            # (the file opened, not yet written); its exit code is what it left
            pass
    for rank, report in sorted(reports.items(), key=lambda item: item[1]["at"]):
        if not report["lost_peer"]:
            return _rank_failed(rank, world_size, report)
    for rank, process in enumerate(processes):
        code = process.exitcode
        if rank not in reports and code not in (None, 0, -signal.SIGTERM):
            if code < 0:
                how = f"was killed by {signal.Signals(-code).name} (the out-of-memory killer, or a signal from outside)"
            else:  # before its function ran (spawn's start-up), or a SystemExit in it: its output has why
                how = f"exited with code {code} without an error of its function (its output above says why)"
            return RankFailed(f"rank {rank} of {world_size} {how}")
    if reports:
        rank = min(reports, key=lambda r: reports[r]["at"])
        return _rank_failed(rank, world_size, reports[rank])
    return None


def _rank_failed(rank: int, world_size: int, report: dict) -> RankFailed:
    err = RankFailed(f"rank {rank} of {world_size} failed: {report['error']}")
    err.add_note(f"rank {rank}'s traceback:\n{report['traceback'].rstrip()}")
    return err


def run_gloo(fn, world_size: int, *args, deepspeed_comm: bool = False) -> None:
    """Call fn(rank, world_size, *args) on world_size new processes; raise `RankFailed` if any fails.

    The processes fork from a server that imported torch, DeepSpeed and the trainer once; each
    starts with the caller's environment, sys.path and working directory, as a spawned one would."""
    with tempfile.TemporaryDirectory(prefix="memlayers-ranks-") as report_dir:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), deepspeed_comm, args, dict(os.environ), report_dir),
            nprocs=world_size,
            join=False,
            start_method=_start_method(),
        )
        # torch's log of the survivors it ends ("Terminating process N via signal SIGTERM"): the
        # clean-up of a failure that RankFailed reports
        torch_log = logging.getLogger("torch.multiprocessing.spawn")
        torch_log.addFilter(_no_survivor_ends)
        try:
            # the grace lets the survivors of a failed rank end by themselves, recording their errors
            while not context.join(grace_period=SURVIVOR_GRACE_S):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException):
            failure = _failure(world_size, report_dir, context.processes)
            if failure is None:
                raise
            raise failure from None
        finally:
            torch_log.removeFilter(_no_survivor_ends)


def _no_survivor_ends(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(("Terminating process", "Unable to shutdown process"))
