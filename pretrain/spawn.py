"""Run a function on W local gloo ranks (127.0.0.1), for tests and CPU benchmarks."""

from __future__ import annotations

import os

import torch.multiprocessing as mp

from pretrain.distributed import free_port


def _entry(rank: int, fn, world_size: int, port: int, deepspeed_comm: bool, args: tuple) -> None:
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
    """Call fn(rank, world_size, *args) on world_size spawned processes; raise if any fails."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), deepspeed_comm, args), nprocs=world_size, join=True)
