"""The throughput clock of the training log.

perf/data_wait_fraction: the share of each logging interval a rank spent waiting for its
batches, the largest over ranks and that rank (perf/data_wait_slowest_rank): the input pipeline
that holds every rank back. Checked against loaders that sleep a known time per batch.
perf/tokens_per_s: of training steps only, not of evaluation or checkpoints."""

from __future__ import annotations

import time
from pathlib import Path

from tests.train.helpers import FakeClock, run_ranks, tiny_config

DELAY = 0.25  # seconds per micro-batch; a step of the tiny config computes in a few hundredths
STEPS = 4


class SlowLoader:
    """A loader whose every batch arrives `delay` seconds late (a slow filesystem)."""

    def __init__(self, loader, delay: float):
        self._loader, self._delay = loader, delay

    def __iter__(self):
        for batch in self._loader:
            time.sleep(self._delay)
            yield batch

    def __getattr__(self, name):  # state_dict, load_state_dict, ...: the wrapped loader's
        return getattr(self._loader, name)


def slow_on(ranks: set[int]):
    def loaders(cfg, dataset, split, rank, world_size, loop, **kwargs):
        from tests.train.helpers import fixed_batches

        loader = fixed_batches(cfg, dataset, split, rank, world_size, loop, **kwargs)
        return SlowLoader(loader, DELAY) if split == "train" and rank in ranks else loader

    return loaders


def logged(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return [e.value for e in board.Scalars(tag)]


def test_a_slow_loader_shows_as_data_wait(tmp_path, data_cache):
    from pretrain.train import train

    for name, ranks in (("slow", {0}), ("fast", set())):
        train(tiny_config(tmp_path / name, data_cache, f"train.max_steps={STEPS}"), loaders=slow_on(ranks))
    slow, fast = (
        logged(tmp_path / "slow", "perf/data_wait_fraction"),
        logged(tmp_path / "fast", "perf/data_wait_fraction"),
    )
    assert len(slow) == len(fast) == STEPS - 1  # the first step (one-time work) is off the clock
    # 2 micro-batches per step: 0.5 s asleep per step against a few hundredths of compute
    assert all(0.5 < f <= 1.0 for f in slow), slow
    assert all(0.0 <= f < s for f, s in zip(fast, slow)), (fast, slow)
    assert set(logged(tmp_path / "slow", "perf/data_wait_slowest_rank")) == {0}


def _slow_rank_1(rank: int, root: str, cache: str) -> list[float]:
    from pretrain.train import train

    train(tiny_config(Path(root), Path(cache), f"train.max_steps={STEPS}"), loaders=slow_on({1}))
    return []


def test_the_rank_whose_loader_is_slow_is_named(tmp_path, data_cache):
    """Rank 1 waits for its batches; rank 0 waits for rank 1 in the collectives, not for data."""
    run_ranks(2, _slow_rank_1, (str(tmp_path / "run"), str(data_cache)), tmp_path / "results")
    assert set(logged(tmp_path / "run", "perf/data_wait_slowest_rank")) == {1}
    # 1 micro-batch per rank per step: 0.25 s asleep per step
    assert all(0.5 < f <= 1.0 for f in logged(tmp_path / "run", "perf/data_wait_fraction"))


def test_evaluation_and_checkpoints_stay_off_the_throughput_clock(tmp_path, data_cache, monkeypatch):
    """A slow evaluation and checkpoint after step 2 must not lower the tokens/s of the interval
    that holds them: tokens/s is of training steps. On a clock that moves only in the objective
    (1 s per micro-batch: 2 s per step of 8 x 32 tokens) and in the evaluation and checkpoint
    (100 s each), every interval reads exactly 128 tokens/s and no data wait; counted, step 3's
    interval would read 256 tokens / 202 s."""
    import pretrain.train as train_module
    from pretrain.train import train

    clock = FakeClock()
    real_objective = train_module.training_objective

    def objective(logits, targets, z_weight):
        clock.advance(1.0)
        return real_objective(logits, targets, z_weight)

    def slow(method):
        def wrapped(self, *args, **kwargs):
            clock.advance(100.0)
            return method(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(train_module, "training_objective", objective)
    monkeypatch.setattr(train_module.Evaluator, "__call__", slow(train_module.Evaluator.__call__))
    monkeypatch.setattr(train_module.Trainer, "save_checkpoint", slow(train_module.Trainer.save_checkpoint))
    cfg = tiny_config(
        tmp_path / "run",
        data_cache,
        f"train.max_steps={STEPS}",
        "train.log_every=1",
        "train.eval_every=2",
        "train.checkpoint_every=2",
    )
    train(cfg)
    assert cfg.train.global_batch * cfg.data.seq_len == 256 and cfg.train.micro_batch * 2 == cfg.train.global_batch
    assert logged(tmp_path / "run", "perf/tokens_per_s") == [128.0] * (STEPS - 1)
    assert logged(tmp_path / "run", "perf/data_wait_fraction") == [0.0] * (STEPS - 1)
