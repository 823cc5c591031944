"""Process groups for memory parallelism: memory groups and replica groups.

With world size W and memory-parallel size P, the memory groups are the consecutive
ranks [g*P, (g+1)*P) (they split each value table by columns); the replica groups are
the ranks holding the same column shard, one per position in a memory group (their
shard gradients are summed). Every rank reads its own data shard: the data-parallel
size is W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from pretrain.model.config import ConfigError


@dataclass(frozen=True)
class MemoryGroups:
    parallel_size: int  # P: ranks sharing one value table, by columns
    world_size: int
    rank: int
    memory_group: object | None  # this rank's memory group; None when P == 1
    replica_group: object | None  # ranks with the same shard position; None when W == P

    @property
    def position(self) -> int:
        """Index of this rank's column shard within its memory group."""
        return self.rank % self.parallel_size

    @property
    def group_index(self) -> int:
        """Which memory group (replica) this rank belongs to; replica 0 writes checkpoints."""
        return self.rank // self.parallel_size

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.parallel_size


def init_memory_groups(parallel_size: int) -> MemoryGroups:
    """Create (collectively, on every rank) the memory and replica groups for P = parallel_size.

    Needs torch.distributed initialised when P > 1; works without it for P = 1 in a
    single process.
    """
    if not isinstance(parallel_size, int) or parallel_size < 1:
        raise ConfigError(f"model.memory.parallel_size={parallel_size!r} must be a positive integer")
    if not (dist.is_available() and dist.is_initialized()):
        if parallel_size > 1:
            raise ConfigError(
                f"model.memory.parallel_size={parallel_size} needs torch.distributed initialised first "
                f"(launch {parallel_size} or a multiple of {parallel_size} ranks with torchrun, the deepspeed "
                "launcher or srun, and call deepspeed.init_distributed before init_memory_groups), "
                "or set model.memory.parallel_size=1"
            )
        return MemoryGroups(1, 1, 0, None, None)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % parallel_size:
        raise ConfigError(
            f"model.memory.parallel_size={parallel_size} does not divide the world size {world}: "
            f"choose a divisor of {world}"
        )
    memory_group = replica_group = None
    # new_group is collective: every rank creates every group, in the same order.
    if parallel_size > 1:
        for g in range(world // parallel_size):
            group = dist.new_group(list(range(g * parallel_size, (g + 1) * parallel_size)))
            if g == rank // parallel_size:
                memory_group = group
    if world > parallel_size:
        for pos in range(parallel_size):
            group = dist.new_group(list(range(pos, world, parallel_size)))
            if pos == rank % parallel_size:
                replica_group = group
    return MemoryGroups(parallel_size, world, rank, memory_group, replica_group)
