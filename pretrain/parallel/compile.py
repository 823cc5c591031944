"""torch.compile applied to a built model, block by block (torchtitan's apply_compile).

Each transformer block's forward is compiled on its own (every block shares one code
object, so dynamo compiles the dense block and the memory block once each and reuses
them); embeddings, the final norm and the output projection stay eager, and the training
objective on their logits is compiled on its own (`compile_objective`). The memory
layer's kernels are custom ops (kernels/ops.py), so a memory block compiles into one
graph: the lookup is two opaque nodes (scoring, bag) that inductor fuses around.
The block's `forward` is replaced on the instance, so parameter names do not change.

Order with activation checkpointing: compile first, then checkpoint, so the compiled
block runs inside the checkpoint (its recomputation runs the compiled code again) and
dynamo never traces the checkpoint's Python-side tape handling.

Under memory parallelism (P > 1) the value table's two collective steps run eagerly
(`torch.compiler.disable` on `PartitionedValueTable._gather_group_inputs` and
`_return_rows`, applied here rather than at import, where it would import dynamo and
with it triton): the memory block's graph breaks around them, the scoring and the dense
parts stay compiled. Their split sizes depend on the data anyway. Traced, they became
asynchronous functional collectives, and a 2-rank P = 2 training run with a cold compile
cache aborted in 1 of 2 tries with a gloo collective mismatch (one rank's 4-byte
all-reduce met the other's 2048-byte all-gather); eager, they are issued in program
order on every rank, as without compile. The value bag with a sparse gradient
(`kernels.ops.sparse_embedding_bag`, the sparse value optimizers' read) runs eagerly too:
it is no custom op, and dynamo tracing into the Triton path's launches failed.

Under ZeRO-3 each compiled block is a DeepSpeed leaf module (`set_z3_leaf_module`): ZeRO-3
gathers and releases all of the block's parameters in hooks on the block itself, which run
around the compiled forward, not inside it (the unit FSDP2 gathers under torchtitan's
per-block compile). Otherwise ZeRO-3 hooks every submodule (each Linear and norm); inside a
compiled block each hook call broke the graph (`_pre_forward_module_hook` is
`torch.compiler.disable`d) and dynamo recompiled the hooks and `nn.Linear.forward` once per
module (`_pre_backward_module_hook` guards on the module's own autograd.Function class,
`nn.Linear.forward` on each weight shape) until its recompile limit (8), after which those
frames ran eagerly for good, silently.
`model.values` is a leaf too, so that its tables, called inside the memory block, carry no
ZeRO-3 hooks: they hold no module parameters (each keeps its shard outside nn.Module
registration), so the hooks had nothing to gather, and still broke the memory block's graph.
The tests' tiny model (2 blocks, one memory block), one rank, 4 steps and an evaluation
(dynamo's counters): ZeRO-3 had 39 graphs, 61 graph breaks, 56 recompilations and 2 frames at
the limit, ZeRO 0 and 1 5 graphs, no break and 3 recompilations (grad mode, block kind); with
the leaves, ZeRO-3 has ZeRO 1's counts (tests/train/test_compile_zero3.py). The mark is read
by ZeRO-3 alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from pretrain.compile_workers import end_compile_workers_at_exit


def apply_compile(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = False) -> None:
    """Compile each block of `model.layers` in place (each a ZeRO-3 leaf module)."""
    set_z3_leaf_module = _z3_leaf_marker()
    _keep_eager_steps()
    if backend == "inductor":
        end_compile_workers_at_exit()
    for i, block in enumerate(model.layers):
        if getattr(block, "_activation_checkpointed", False):
            raise ValueError(
                f"apply_compile must run before apply_activation_checkpointing (block {i} is already checkpointed)"
            )
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=fullgraph)
        set_z3_leaf_module(block, True)
    set_z3_leaf_module(model.values, True)


def _z3_leaf_marker() -> Callable[[nn.Module, bool], object]:
    """DeepSpeed's ZeRO-3 leaf mark, or a no-op where DeepSpeed is not installed (no ZeRO-3 there:
    the kernels' compile tests run in an environment with torch and triton alone)."""
    try:
        from deepspeed.utils import set_z3_leaf_module
    except ImportError:
        return lambda module, flag: None
    return set_z3_leaf_module


def compile_objective(objective: Callable, *, backend: str = "inductor") -> Callable:
    """`objective` (pretrain.model.training_objective) compiled: inductor fuses the fp32
    upcast, the log-softmax and their backward into a few passes over the logits, which
    eager mode materialises in fp32 (2 GiB each at 8 x 2048 tokens and 32K vocabulary).
    Shapes are static: a micro-batch's shape does not change within a run."""
    if backend == "inductor":
        end_compile_workers_at_exit()
    return torch.compile(objective, backend=backend, dynamic=False)


def _keep_eager_steps() -> None:
    """Wrap the memory-group collective steps and the sparse-gradient bag in
    `torch.compiler.disable` (once)."""
    import kernels.ops
    from pretrain.parallel.values import PartitionedValueTable

    for owner, name in (
        (PartitionedValueTable, "_gather_group_inputs"),
        (PartitionedValueTable, "_return_rows"),
        (kernels.ops, "sparse_embedding_bag"),
        (PartitionedValueTable, "_sparse_bag"),
    ):
        step = getattr(owner, name)
        if not getattr(step, "_memlayers_eager", False):
            eager = torch.compiler.disable(step)
            eager._memlayers_eager = True
            setattr(owner, name, eager)
