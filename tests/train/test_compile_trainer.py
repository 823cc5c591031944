"""`train.compile=true` in the trainer on 2 gloo ranks with memory parallelism P = 2 and
ZeRO 1 and 3 (inductor, CPU): losses, final dense weights and value shards match the
eager run within 1e-5, and the slot tables are identical (the compiled blocks run the
value-pool collectives and count each lookup once)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.helpers import tiny_config, world2_suite
from tests.train.test_activation_checkpointing_trainer import _weights
from tests.train.test_trainer import assert_same_tables

STEPS = 3
STAGES = (1, 3)


def _suite(rank: int, root: str, cache: str) -> dict:
    from pretrain.train import train
    from tests.train.helpers import fixed_batches

    out = {}
    for stage in STAGES:
        for compiled in (False, True):
            name = f"z{stage}-{'compiled' if compiled else 'eager'}"
            cfg = tiny_config(
                Path(root) / name,
                Path(cache),
                f"train.zero_stage={stage}",
                f"train.max_steps={STEPS}",
                "train.micro_batch=2",  # 2 micro-batches per step
                "model.memory.parallel_size=2",
                f"train.compile={str(compiled).lower()}",
            )
            out[name] = train(cfg, loaders=fixed_batches).losses
    return out


@pytest.fixture(scope="module")
def world2(tmp_path_factory, data_cache):
    return world2_suite(tmp_path_factory, "compile_world2", _suite, data_cache)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_compiled_trainer_matches_eager_with_memory_parallelism(world2, stage):
    root, losses = world2
    eager, compiled = losses[f"z{stage}-eager"], losses[f"z{stage}-compiled"]
    assert len(eager) == STEPS
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=0)
    want, got = _weights(root / f"z{stage}-eager"), _weights(root / f"z{stage}-compiled")
    assert got.keys() == want.keys() and any(k.startswith("values") for k in want)
    for key in want:  # dense weights, product keys and every value shard
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert_same_tables(root / f"z{stage}-eager", root / f"z{stage}-compiled")
