"""Memory parallelism: each value table split by columns over a memory-parallel group.

A 1024^2 x 2048 value pool is 2B parameters; replicating it (or ZeRO-3 gathering it
every layer) does not scale. Instead the table is cut into P column shards over a
memory group of P consecutive ranks, and only slot indices, weights and bag outputs
move (see `values.PartitionedValueTable`). Groups: `groups.init_memory_groups`.

Why the value shards live outside the DeepSpeed engine, for every P (P = 1 included),
with their own optimizer (torch AdamW, or the lazy `SparseAdamW` below; lr = optim.value_lr x
the schedule's multiplier, or fixed under optim.value_lr_schedule=constant; no weight decay),
gradient reduction and clipping (`MemoryParallel`):
  * DeepSpeed broadcasts every module parameter from rank 0 at initialize; the
    shards of one group are different tensors and must not be overwritten.
  * ZeRO partitions and all-gathers module parameters; gathering the pool is exactly
    the traffic memory parallelism avoids.
  * DeepSpeed averages gradients over the data-parallel world; inside a memory group
    the shard gradient already covers all of the group's tokens, so only a sum over
    replicas (ranks with the same shard) is right.
  * DeepSpeed's MoE expert-parallel mechanism (parameters with allreduce=False and a
    group_name, reduced over expert-data-parallel groups) was considered: it needs
    DeepSpeed's expert groups, set up for expert layers and their gating, and its
    bookkeeping (checkpoint naming, ZeRO handling) assumes experts; it does not fit a
    column-sharded table read by an embedding bag.
  * One code path for all P makes P = 1 vs P = 2 equivalence hold by construction: in
    fp32 up to summation order; in bf16 the forward and the value gradients are bitwise
    equal, while the softmax weights' gradient is summed from P per-shard dot products
    each rounded to bf16 (measured at T 200, d 256, H 4, k 8: 2.5e-3 relative to
    float64 at P = 2 against 1.7e-3 at P = 1, below bf16's 3.9e-3 step).
The shards are plain leaf tensors not registered on the model, so module.parameters(),
state_dict(), dtype casts and the engine never see them. Initialisation is
sharding-invariant (`ValueTable.init_columns`): each rank draws only its own columns,
never the full table, and never receives a broadcast.

Gradient semantics: each rank's loss is its local mean and DeepSpeed averages dense
gradients over the world; `MemoryParallel.reduce_gradients` sums the shard gradients
over the replica group and divides by the world size, which reproduces world-1
training exactly. Clipping uses the norm of the full logical tables (all-reduced over
the memory group) with optim.grad_clip, separately from the dense parameters' norm.

Row-sparse updates: with optim.value_optimizer=sparse_adamw the shards' gradients are
the rows read (sparse COO, added lookup by lookup into one buffer by `held_rows`, merged and
reduced by `row_grads`) and `sparse_adamw.SparseAdamW` (lazy Adam)
updates only those rows; the calls above are unchanged.

Checkpoints: `MemoryParallel.save` writes one safetensors file per (table, shard)
with the AdamW state; `load` re-shards to any P dividing v_dim (`shard_files`, whose
`consolidate` assembles whole tables in memory).
"""

from pretrain.parallel.groups import MemoryGroups, init_memory_groups
from pretrain.parallel.memory_parallel import MemoryParallel
from pretrain.parallel.shard_files import ShardFileError
from pretrain.parallel.values import PartitionedValueTable, parallelize_memory

__all__ = [
    "MemoryGroups",
    "MemoryParallel",
    "PartitionedValueTable",
    "ShardFileError",
    "init_memory_groups",
    "parallelize_memory",
]
