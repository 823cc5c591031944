"""`train.compile=true` in the trainer on 2 gloo ranks with memory parallelism P = 2 and
ZeRO 1 and 3 (inductor, CPU): losses, final dense weights, value shards and the final
evaluation's validation loss match the eager run within 1e-5, and the slot tables are
identical (the compiled blocks run the value-pool collectives and count each lookup once)."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import assert_same_tables, final_fp32_weights, train_p2_variants, world2_suite

STEPS = 3
STAGES = (1, 3)
# No fact-recall probes in the final evaluation: their batch (4 rows of the longest probe's length
# per rank) is a third shape, which dynamo recompiles both blocks for with dynamic shapes, on every
# rank and stage: measured, the compiled ZeRO-1 run took 33.5 s with them and 14.9 s without, for a
# result this test never compared. The evaluation still runs compiled (validation loss, with the
# value pool's collectives), and is now compared with eager's.
NO_PROBES = "train.probe_limit=0"


def _suite(rank: int, root: str, cache: str) -> dict:
    variants = {"eager": "train.compile=false", "compiled": "train.compile=true"}
    evals: dict = {}
    losses = train_p2_variants(root, cache, STAGES, STEPS, variants, NO_PROBES, evals=evals)
    return {"losses": losses, "evals": evals}


@pytest.fixture(scope="module")
def world2(tmp_path_factory, data_cache):
    return world2_suite(tmp_path_factory, "compile_world2", _suite, data_cache)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_compiled_trainer_matches_eager_with_memory_parallelism(world2, stage):
    root, results = world2
    losses, evals = results["losses"], results["evals"]
    eager, compiled = losses[f"z{stage}-eager"], losses[f"z{stage}-compiled"]
    assert len(eager) == STEPS
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=0)
    want, got = final_fp32_weights(root / f"z{stage}-eager"), final_fp32_weights(root / f"z{stage}-compiled")
    assert got.keys() == want.keys() and any(k.startswith("values") for k in want)
    for key in want:  # dense weights, product keys and every value shard
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert_same_tables(root / f"z{stage}-eager", root / f"z{stage}-compiled")
    eager_eval, compiled_eval = evals[f"z{stage}-eager"], evals[f"z{stage}-compiled"]
    assert "val_loss" in eager_eval and compiled_eval.keys() == eager_eval.keys()
    torch.testing.assert_close(compiled_eval["val_loss"], eager_eval["val_loss"], rtol=1e-5, atol=0)
