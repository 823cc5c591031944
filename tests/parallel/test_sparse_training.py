"""The trainer with optim.value_optimizer=sparse_adamw: exact resume (N + N steps == 2N, bitwise)."""

from __future__ import annotations

import pytest
import torch

from pretrain.checkpoint import latest_checkpoint
from pretrain.train import train
from tests.train.helpers import tiny_config
from tests.train.test_trainer import assert_same_tables, final_parameters

SPARSE = "optim.value_optimizer=sparse_adamw"


@pytest.mark.slow
def test_sparse_optimizer_resume_is_exact(tmp_path, data_cache):
    opts = ("train.max_steps=4", SPARSE)  # global batch 8, micro batch 4: two accumulated micro-batches
    straight = train(tiny_config(tmp_path / "a", data_cache, *opts))
    first = train(tiny_config(tmp_path / "b", data_cache, *opts, "train.stop_after=2"))
    assert first.step == 2 and latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_00000002"
    second = train(tiny_config(tmp_path / "b", data_cache, *opts))
    assert second.step == 4
    assert first.losses + second.losses == straight.losses  # bitwise: same floats
    a, b = final_parameters(tmp_path / "a"), final_parameters(tmp_path / "b")
    assert a.keys() == b.keys() and any(k.endswith(":exp_avg") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert_same_tables(tmp_path / "a", tmp_path / "b")
    # lazy Adam: with 256 slots some rows were never read, and their moments are still zero
    moments = [v for k, v in a.items() if k.endswith(":exp_avg")]
    assert any(m.abs().sum(1).eq(0).any() for m in moments)
