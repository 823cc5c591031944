"""`train.compile=true` under ZeRO-3 (one gloo rank, inductor, CPU) compiles the model as under
ZeRO 1: ZeRO-3's per-module hooks (parameter gathering, `torch.compiler.disable`d) ran inside each
compiled block and broke its graph at every submodule call; dynamo then recompiled the hooks and
`nn.Linear.forward` per module until its recompile limit and ran those frames eagerly for good,
silently. Here both stages train and evaluate the memory model without a graph break and with the
same number of graphs, and `fail_on_recompile_limit_hit` turns that silent fallback into an error."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

from tests.train.helpers import fixed_batches, one_rank_results, tiny_config

STEPS = 2
STAGES = (1, 3)


def _compiled_runs(rank: int, world: int, out, *, root: str, cache: str) -> None:
    import torch._dynamo
    from torch._dynamo.utils import counters

    from pretrain.train import train

    torch._dynamo.config.fail_on_recompile_limit_hit = True
    for stage in STAGES:
        torch._dynamo.reset()
        counters.clear()
        cfg = tiny_config(
            Path(root) / f"z{stage}",
            Path(cache),
            f"train.zero_stage={stage}",
            "train.compile=true",
            f"train.max_steps={STEPS}",
            "train.probe_limit=0",
        )
        result = train(cfg, loaders=fixed_batches)
        out[stage] = {
            "steps": len(result.losses),
            "graph_breaks": sum(counters["graph_break"].values()),
            "graphs": counters["stats"]["unique_graphs"],
        }


@pytest.mark.slow
def test_zero3_compiles_the_blocks_as_zero1_does(tmp_path, data_cache):
    runs = one_rank_results(functools.partial(_compiled_runs, root=str(tmp_path), cache=str(data_cache)))
    zero1, zero3 = runs[1], runs[3]
    assert zero1["steps"] == zero3["steps"] == STEPS
    assert zero1["graph_breaks"] == 0 and zero1["graphs"] > 0, zero1
    assert zero3 == zero1
