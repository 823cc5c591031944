"""Activation checkpointing changes no number: every mode's loss, dense/key/value
gradients and handed-over slots equal mode none, for world 1 and for world 2 with P = 2
(where a recomputation must replay, not repeat, the value-pool collectives)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from parallel_helpers import GLOBAL_BATCH, OPTIM, batches, tiny_cfg
from pretrain.model.lookups import LookupRecorder
from pretrain.model.objective import language_model_loss
from pretrain.model.transformer import Transformer
from pretrain.parallel import MemoryParallel, init_memory_groups
from pretrain.parallel.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpointed_layers,
)
from pretrain.spawn import run_gloo

MODES = ("full", "memory", "selective")


def one_step(mode: str, groups, rank: int, world: int) -> dict:
    """Loss, every gradient and the handed-over slots of one forward/backward under `mode`."""
    cfg = tiny_cfg()
    torch.manual_seed(0)
    model = Transformer(cfg)
    mp = MemoryParallel(model, groups, OPTIM, kernel="torch")
    apply_activation_checkpointing(model, mode)
    recorder = LookupRecorder(model.memory_layers())
    per_rank = GLOBAL_BATCH // world
    tokens = batches(1)[0][rank * per_rank : (rank + 1) * per_rank]
    loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    out = {"loss": loss.detach().reshape(1)}
    out.update({n: p.grad for n, p in model.named_parameters()})  # dense weights and product keys
    out.update({f"value_shard.{i}": t.shard.grad for i, t in enumerate(mp.tables)})
    out.update({f"slots.{i}": idx for i, idx in enumerate(recorder.take())})
    out["lookups_recorded"] = torch.tensor([len(mp._lookups)])
    out["comm_bytes"] = torch.tensor([sum(t.counter.take() for t in mp.tables)])
    return out


def assert_identical(got: dict, want: dict, mode: str) -> None:
    assert got.keys() == want.keys()
    for name in want:
        # the same operations on the same inputs: bitwise equal, not merely close
        assert torch.equal(got[name], want[name]), f"mode {mode}: {name} differs from mode none"


def test_each_mode_equals_none_world1():
    groups = init_memory_groups(1)
    reference = one_step("none", groups, 0, 1)
    assert all(v is not None for v in reference.values())
    for mode in MODES:
        assert_identical(one_step(mode, groups, 0, 1), reference, mode)


def _world2(rank: int, world: int, out_dir: str) -> None:
    groups = init_memory_groups(2)
    results = {mode: one_step(mode, groups, rank, world) for mode in ("none", *MODES)}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")


def test_each_mode_equals_none_world2_memory_parallel(tmp_path):
    run_gloo(_world2, 2, str(tmp_path))
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        reference = results["none"]
        assert reference["comm_bytes"].item() > 0  # P = 2 did communicate
        for mode in MODES:
            # includes comm_bytes: the recomputation moved no byte more than mode none
            assert_identical(results[mode], reference, mode)


def test_modes_choose_the_documented_blocks():
    blocks = Transformer(tiny_cfg()).layers  # memory layers 0 and 2 of 3
    assert checkpointed_layers(blocks, "none") == []
    assert checkpointed_layers(blocks, "full") == [0, 1, 2]
    assert checkpointed_layers(blocks, "memory") == [0, 2]
    assert checkpointed_layers(blocks, "selective") == [0, 2]
    assert checkpointed_layers(blocks, "selective", [1]) == [1]
    with pytest.raises(ValueError, match="activation_checkpointing_layers"):
        checkpointed_layers(blocks, "selective", [3])
    with pytest.raises(ValueError, match="must be one of"):
        checkpointed_layers(blocks, "everything")


def test_full_checkpointing_keeps_fewer_activations():
    """The saving is real: fewer bytes held by autograd between forward and backward."""

    def saved_bytes(mode: str) -> int:
        torch.manual_seed(0)
        model = Transformer(tiny_cfg())
        apply_activation_checkpointing(model, mode)
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        tokens = batches(1)[0]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        return sum(seen.values())

    assert saved_bytes("full") < 0.5 * saved_bytes("none")
