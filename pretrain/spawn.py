"""Run a function on W local gloo ranks (127.0.0.1), for tests and CPU benchmarks."""

from __future__ import annotations

import multiprocessing
import os

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


def rank_context():
    """The multiprocessing context `run_gloo` starts its ranks in, for callers that start their own
    processes: the fork server's (a child has the server's environment: pass the caller's and apply
    it first, as `_entry` does), else spawn's."""
    return multiprocessing.get_context(_start_method())


def _entry(
    rank: int, fn, world_size: int, port: int, deepspeed_comm: bool, args: tuple, environ: dict | None = None
) -> None:
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


def run_gloo(fn, world_size: int, *args, deepspeed_comm: bool = False) -> None:
    """Call fn(rank, world_size, *args) on world_size new processes; raise if any fails.

    The processes fork from a server that imported torch, DeepSpeed and the trainer once; each
    starts with the caller's environment, sys.path and working directory, as a spawned one would."""
    mp.start_processes(
        _entry,
        args=(fn, world_size, free_port(), deepspeed_comm, args, dict(os.environ)),
        nprocs=world_size,
        join=True,
        start_method=_start_method(),
    )
