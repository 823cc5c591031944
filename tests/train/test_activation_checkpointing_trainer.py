"""The trainer with each activation-checkpointing mode on 2 gloo ranks, memory parallelism
P = 2, ZeRO 1 and 3: losses, final dense weights, value shards and slot tables are
bitwise those of mode none (slot counts conserved: no lookup counted twice)."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import assert_same_tables, final_fp32_weights, train_p2_variants, world2_suite

STEPS = 3
MODES = ("none", "full", "memory", "selective")
STAGES = (1, 3)


def _suite(rank: int, root: str, cache: str) -> dict:
    modes = {mode: f"train.activation_checkpointing={mode}" for mode in MODES}
    return train_p2_variants(root, cache, STAGES, STEPS, modes)


@pytest.fixture(scope="module")
def world2(tmp_path_factory, data_cache):
    return world2_suite(tmp_path_factory, "ac_world2", _suite, data_cache)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_every_mode_trains_exactly_like_none(world2, stage):
    root, losses = world2
    reference = losses[f"z{stage}-none"]
    want = final_fp32_weights(root / f"z{stage}-none")
    assert len(reference) == STEPS and any(k.startswith("values") for k in want)
    for mode in MODES[1:]:
        assert losses[f"z{stage}-{mode}"] == reference, mode  # bitwise: the same floats
        got = final_fp32_weights(root / f"z{stage}-{mode}")
        assert got.keys() == want.keys()
        for key in want:  # updated by every gradient: dense, keys, value shards
            assert torch.equal(got[key], want[key]), f"{mode}: {key}"
        assert_same_tables(root / f"z{stage}-none", root / f"z{stage}-{mode}")
