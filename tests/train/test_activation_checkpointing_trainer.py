"""The trainer with each activation-checkpointing mode on 2 gloo ranks, memory parallelism
P = 2, ZeRO 1 and 3: losses, final dense weights, value shards and slot tables are
bitwise those of mode none (slot counts conserved: no lookup counted twice)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.train.helpers import tiny_config, world2_suite
from tests.train.test_trainer import assert_same_tables

STEPS = 3
MODES = ("none", "full", "memory", "selective")
STAGES = (1, 3)


def _suite(rank: int, root: str, cache: str) -> dict:
    from pretrain.train import train
    from tests.train.helpers import fixed_batches

    out = {}
    for stage in STAGES:
        for mode in MODES:
            cfg = tiny_config(
                Path(root) / f"z{stage}-{mode}",
                Path(cache),
                f"train.zero_stage={stage}",
                f"train.max_steps={STEPS}",
                "train.micro_batch=2",  # 2 micro-batches per step
                "model.memory.parallel_size=2",
                f"train.activation_checkpointing={mode}",
            )
            out[f"z{stage}-{mode}"] = train(cfg, loaders=fixed_batches).losses
    return out


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 dense weights (assembled from the ZeRO partitions) and every value shard file."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file

    from pretrain.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    weights = dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name))
    for shard in sorted(ckpt.glob("values*.safetensors")):
        weights.update({f"{shard.name}:{k}": v for k, v in load_file(shard).items()})
    return weights


@pytest.fixture(scope="module")
def world2(tmp_path_factory, data_cache):
    return world2_suite(tmp_path_factory, "ac_world2", _suite, data_cache)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_every_mode_trains_exactly_like_none(world2, stage):
    root, losses = world2
    reference = losses[f"z{stage}-none"]
    want = _weights(root / f"z{stage}-none")
    assert len(reference) == STEPS and any(k.startswith("values") for k in want)
    for mode in MODES[1:]:
        assert losses[f"z{stage}-{mode}"] == reference, mode  # bitwise: the same floats
        got = _weights(root / f"z{stage}-{mode}")
        assert got.keys() == want.keys()
        for key in want:  # updated by every gradient: dense, keys, value shards
            assert torch.equal(got[key], want[key]), f"{mode}: {key}"
        assert_same_tables(root / f"z{stage}-none", root / f"z{stage}-{mode}")
