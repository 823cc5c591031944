"""torch.compile applied to a built model, block by block (torchtitan's apply_compile).

Each transformer block's forward is compiled on its own (every block shares one code
object, so dynamo compiles the dense block and the memory block once each and reuses
them); embeddings, the final norm and the output projection stay eager. The memory
layer's kernels are custom ops (kernels/ops.py), so a memory block compiles into one
graph: the lookup is two opaque nodes (scoring, bag) that inductor fuses around.
The block's `forward` is replaced on the instance, so parameter names do not change.

Order with activation checkpointing: compile first, then checkpoint, so the compiled
block runs inside the checkpoint (its recomputation runs the compiled code again) and
dynamo never traces the checkpoint's Python-side tape handling.

Under memory parallelism (P > 1) the value table's collectives are Python
autograd.Functions over torch.distributed: dynamo runs them eagerly (a graph break
inside the value lookup only, the scoring and the dense parts stay compiled).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def apply_compile(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = False) -> int:
    """Compile each block of `model.layers` in place; return how many were compiled."""
    for i, block in enumerate(model.layers):
        if getattr(block, "_activation_checkpointed", False):
            raise ValueError(
                f"apply_compile must run before apply_activation_checkpointing (block {i} is already checkpointed)"
            )
        block.forward = torch.compile(block.forward, backend=backend, fullgraph=fullgraph)
    return len(model.layers)
