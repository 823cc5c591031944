"""A non-finite loss on one rank only (a bad batch there) skips the step on every rank, as one on
every rank does: the ranks agree on the skip (the loss's all-reduce carries a non-finite flag), so
none applies an update the others skip and the replicas never part. Reference: the same run with
the step's loss poisoned on both ranks. Ranks as in test_one_rank_faults.py."""

from __future__ import annotations

import math
from pathlib import Path

from tests.train.helpers import run_ranks_outcome, tiny_config

POISONED_STEP = 2


def _train_with_a_poisoned_step(rank: int, run: str, cache: str) -> dict:
    """Two runs of 4 steps: step 2's loss NaN on rank 1 alone, then on both ranks. Per run: the
    losses this rank logged, its skipped steps, and a sum of each of its parameters at the end."""
    from pretrain import build as build_module
    from pretrain import train as train_module
    from pretrain import trainer as trainer_module

    real_objective, real_fit = build_module.training_objective, trainer_module.Trainer.fit
    out, poisoned_ranks, calls, params = {}, set(), [0], {}

    def objective(logits, targets, *args):
        result = real_objective(logits, targets, *args)
        calls[0] += 1  # one micro-batch a step here
        if calls[0] == POISONED_STEP and rank in poisoned_ranks:
            nan = float("nan")
            return type(result)(result.loss * nan, result.z, result.total * nan)
        return result

    def fit(self, stop):
        result = real_fit(self, stop)
        params.update({n: float(p.detach().double().sum()) for n, p in self.engine.module.named_parameters()})
        return result

    build_module.training_objective, trainer_module.Trainer.fit = objective, fit
    for name, ranks in (("one rank", {1}), ("every rank", {0, 1})):
        poisoned_ranks.clear()
        poisoned_ranks.update(ranks)
        calls[0] = 0
        params.clear()
        cfg = tiny_config(Path(run) / name.replace(" ", "-"), Path(cache), "train.max_steps=4", "train.nan_policy=skip")
        result = train_module.train(cfg)
        out[name] = {"losses": result.losses, "skipped": result.skipped_steps, "params": dict(params)}
    return out


def test_a_nan_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path, data_cache):
    ranks = run_ranks_outcome(2, _train_with_a_poisoned_step, (str(tmp_path), str(data_cache)), tmp_path / "out", 300)
    for rank, outcome in enumerate(ranks):
        assert outcome is not None, f"rank {rank} still waits after 300 s"
        assert "result" in outcome, f"rank {rank}: {outcome['error']}: {outcome['message']}\n{outcome['traceback']}"
    got = [r["result"] for r in ranks]
    reference = got[0]["every rank"]
    assert reference["skipped"] == 1 and len(reference["losses"]) == 3
    for rank in got:
        one = rank["one rank"]
        assert one["skipped"] == 1 and one["losses"] == reference["losses"]
        assert all(math.isfinite(v) for v in one["params"].values())
        assert one["params"] == reference["params"]  # bitwise: the same updates, the same skip
