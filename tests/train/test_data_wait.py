"""The throughput clock of the training log.

perf/data_wait_fraction: the share of each logging interval a rank spent waiting for its
batches, the largest over ranks and that rank (perf/data_wait_slowest_rank): the input pipeline
that holds every rank back. Checked on a clock that moves only when a batch arrives (DELAY) and
when a micro-batch's loss is computed (COMPUTE), so each share is known exactly whatever else
the machine is doing (wall-clock sleeps read 40% instead of over 50% under CI load).
perf/tokens_per_s: of training steps only, not of evaluation or checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.train.helpers import FakeClock, run_ranks, tiny_config

DELAY = 0.25  # seconds per micro-batch of a slow loader
COMPUTE = 0.05  # seconds per micro-batch's forward and backward
STEPS = 4


class SlowLoader:
    """A loader whose every batch arrives `delay` seconds late (a slow filesystem), on `clock`."""

    def __init__(self, loader, delay: float, clock: FakeClock):
        self._loader, self._delay, self._clock = loader, delay, clock

    def __iter__(self):
        for batch in self._loader:
            self._clock.advance(self._delay)
            yield batch

    def __getattr__(self, name):  # state_dict, load_state_dict, ...: the wrapped loader's
        return getattr(self._loader, name)


def on_fake_clock(monkeypatch: pytest.MonkeyPatch, compute: float = COMPUTE) -> FakeClock:
    """The training loop's clock (pretrain.trainer's), moving `compute` seconds per micro-batch objective and otherwise
    only when a test advances it."""
    import pretrain.build as build_module
    import pretrain.trainer as trainer_module

    clock, real_objective = FakeClock(), build_module.training_objective

    def objective(logits, targets, z_weight):
        clock.advance(compute)
        return real_objective(logits, targets, z_weight)

    monkeypatch.setattr(trainer_module, "time", clock)
    monkeypatch.setattr(build_module, "training_objective", objective)
    return clock


def slow_on(ranks: set[int], clock: FakeClock):
    def loaders(cfg, dataset, split, rank, world_size, loop, **kwargs):
        from tests.train.helpers import fixed_batches

        loader = fixed_batches(cfg, dataset, split, rank, world_size, loop, **kwargs)
        return SlowLoader(loader, DELAY, clock) if split == "train" and rank in ranks else loader

    return loaders


def logged(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return [e.value for e in board.Scalars(tag)]


def test_a_slow_loader_shows_as_data_wait(tmp_path, data_cache, monkeypatch):
    from pretrain.train import train

    clock = on_fake_clock(monkeypatch)
    for name, ranks in (("slow", {0}), ("fast", set())):
        train(tiny_config(tmp_path / name, data_cache, f"train.max_steps={STEPS}"), loaders=slow_on(ranks, clock))
    slow, fast = (
        logged(tmp_path / "slow", "perf/data_wait_fraction"),
        logged(tmp_path / "fast", "perf/data_wait_fraction"),
    )
    assert len(slow) == len(fast) == STEPS - 1  # the first step (one-time work) is off the clock
    # each of the 2 micro-batches of a step: DELAY waiting, then COMPUTE
    assert slow == pytest.approx([DELAY / (DELAY + COMPUTE)] * (STEPS - 1))
    assert fast == [0.0] * (STEPS - 1)
    assert set(logged(tmp_path / "slow", "perf/data_wait_slowest_rank")) == {0}


def _slow_rank_1(rank: int, root: str, cache: str) -> list[float]:
    from pretrain.train import train

    with pytest.MonkeyPatch.context() as monkeypatch:
        clock = on_fake_clock(monkeypatch)
        train(tiny_config(Path(root), Path(cache), f"train.max_steps={STEPS}"), loaders=slow_on({1}, clock))
    return []


def test_the_rank_whose_loader_is_slow_is_named(tmp_path, data_cache):
    """Rank 1 waits for its batches; rank 0 for none (its wait for rank 1 is in the collectives)."""
    run_ranks(2, _slow_rank_1, (str(tmp_path / "run"), str(data_cache)), tmp_path / "results")
    assert set(logged(tmp_path / "run", "perf/data_wait_slowest_rank")) == {1}
    # 1 micro-batch per rank per step: DELAY waiting, then COMPUTE
    assert logged(tmp_path / "run", "perf/data_wait_fraction") == pytest.approx(
        [DELAY / (DELAY + COMPUTE)] * (STEPS - 1)
    )


def test_evaluation_and_checkpoints_stay_off_the_throughput_clock(tmp_path, data_cache, monkeypatch):
    """A slow evaluation and checkpoint after step 2 must not lower the tokens/s of the interval
    that holds them: tokens/s is of training steps. On a clock that moves only in the objective
    (1 s per micro-batch: 2 s per step of 8 x 32 tokens) and in the evaluation and checkpoint
    (100 s each), every interval reads exactly 128 tokens/s and no data wait; counted, step 3's
    interval would read 256 tokens / 202 s."""
    from pretrain.evaluate import Evaluator
    from pretrain.train import train
    from pretrain.trainer import Trainer

    clock = on_fake_clock(monkeypatch, compute=1.0)

    def slow(method):
        def wrapped(self, *args, **kwargs):
            clock.advance(100.0)
            return method(self, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(Evaluator, "__call__", slow(Evaluator.__call__))
    monkeypatch.setattr(Trainer, "save_checkpoint", slow(Trainer.save_checkpoint))
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
