"""Activation checkpointing applied to a built model (torchtitan's apply_ac).

`apply_activation_checkpointing(model, mode, layers)` wraps the forward of chosen
transformer blocks in a non-reentrant `torch.utils.checkpoint`: the block keeps only
its input; everything inside is recomputed during backward. The model code does not
change and parameter names stay the same (the block's `forward` is replaced on the
instance, not the module wrapped), so checkpoints, exports and ZeRO see the same model.

Modes (train.activation_checkpointing):
  none       nothing recomputed.
  full       every block: keeps one (B, S, dim) input per block; costs about one more
             forward of the whole model per step.
  memory     only memory blocks: their scoring (query projection, half-key scores
             (T, heads, n_keys) x 2, candidate top-k) and attention activations are
             recomputed; the lookup output (T, v_dim) is kept for P > 1 (see below).
  selective  every other block (0, 2, 4, ...), or the blocks listed in
             train.activation_checkpointing_layers: about half the saving of full, at
             half its recomputation.

Recompute safety (pretrain/model/recompute.py): each checkpointed call gets a
`LookupTape`; the checkpoint's context_fn enters it in recording mode around the real
forward and in replay mode around the recomputation. During replay the memory layer
hands no slots to its readers (slot counts stay those of mode none) and a partitioned
value table (P > 1) replays the gathered indices/weights and exchanged output instead of
running its collectives again. Non-reentrant checkpointing is used because it composes
with autograd hooks (ZeRO-3 parameter gathering), keyword arguments and a context_fn.

Determinism: the recomputation must select the same slots as the real forward. The
PyTorch and Triton scoring paths are deterministic for identical inputs; under P > 1
the bag's indices come from the tape anyway.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from pretrain.model.config import ConfigError
from pretrain.model.recompute import LookupTape

MODES = ("none", "full", "memory", "selective")


def checkpointed_layers(blocks: Sequence, mode: str, layers: list[int] | None = None) -> list[int]:
    """Indices of the blocks that `mode` checkpoints: `Transformer.layers`, or stand-ins with each
    block's `is_memory` (pretrain/model/memory_budget.py)."""
    if mode not in MODES:
        raise ConfigError(f"train.activation_checkpointing={mode!r} must be one of {', '.join(MODES)}")
    n = len(blocks)
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n))
    if mode == "memory":
        return [i for i, block in enumerate(blocks) if block.is_memory]
    chosen = list(layers) if layers else list(range(0, n, 2))
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise ConfigError(f"train.activation_checkpointing_layers={list(layers)} names blocks {bad} outside 0..{n - 1}")
    return sorted(set(chosen))


def _tape_contexts():
    tape = LookupTape()
    return tape.recording(), tape.replaying_context()


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, context_fn=_tape_contexts, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str, layers: list[int] | None = None) -> None:
    """Checkpoint the blocks `mode` selects in `model.layers` (`checkpointed_layers` names them).

    Call after building the model (and after `apply_compile`, so that the compiled block
    runs inside the checkpoint); calling twice on one model is refused.
    """
    blocks = model.layers
    chosen = checkpointed_layers(blocks, mode, layers)
    for i in chosen:
        block = blocks[i]
        if getattr(block, "_activation_checkpointed", False):
            raise ValueError(f"block {i} is already checkpointed: apply_activation_checkpointing once per model")
        block.forward = functools.partial(_checkpointed, block.forward)
        block._activation_checkpointed = True
