"""The logged training metrics against hand counts: throughput on a fake clock, per-interval
peaks, loss means, slot statistics at the last step."""

from __future__ import annotations

import pytest
import torch

import pretrain.build as build_module
import pretrain.trainer as trainer_module
from pretrain.build import build_loader
from pretrain.model import flops_per_token
from pretrain.train import train
from tests.train.helpers import FakeClock, tiny_config


def scalars(run_dir) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of a run's TensorBoard scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    return {tag: {e.step: e.value for e in board.Scalars(tag)} for tag in board.Tags()["scalars"]}


class FirstBatchWaits:
    """A training loader whose first batch takes `seconds` of the clock (workers starting)."""

    def __init__(self, loader, clock: FakeClock, seconds: float):
        self.loader, self.clock, self.seconds = loader, clock, seconds

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == 0:
                self.clock.advance(self.seconds)
            yield batch

    def __getattr__(self, name):  # state_dict, load_state_dict, tokens_per_source
        return getattr(self.loader, name)


def test_the_first_step_is_left_out_of_throughput(tmp_path, data_cache, monkeypatch):
    """On a clock that moves only in the loader (5 s for the first batch) and in the objective
    (10 s for the first micro-batch, compilation; 1 s for each other), steps 2-4 take 2 s each
    (2 micro-batches of 8 x 32 tokens per step): 128 tokens/s and no data wait in both log
    intervals, and the first step's 16 s on its own. Before, the first interval read
    512 tokens / 18 s and a data wait of 5/18."""
    clock, calls = FakeClock(), {"n": 0}
    real_objective = build_module.training_objective

    def objective(logits, targets, z_weight):
        calls["n"] += 1
        clock.advance(10.0 if calls["n"] == 1 else 1.0)
        return real_objective(logits, targets, z_weight)

    def loaders(cfg, dataset, split, rank, world_size, loop, **kwargs):
        loader = build_loader(cfg, dataset, split, rank, world_size, loop, **kwargs)
        return FirstBatchWaits(loader, clock, 5.0) if split == "train" else loader

    monkeypatch.setattr(trainer_module, "time", clock)
    monkeypatch.setattr(build_module, "training_objective", objective)
    cfg = tiny_config(tmp_path / "run", data_cache, "train.max_steps=4", "train.log_every=2", "train.peak_flops=1e9")
    train(cfg, loaders=loaders)
    logged = scalars(tmp_path / "run")
    assert logged["perf/first_step_time_s"] == {1: 16.0}
    assert logged["perf/tokens_per_s"] == {2: 128.0, 4: 128.0}
    assert logged["perf/data_wait_fraction"] == {2: 0.0, 4: 0.0}
    per_token = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    assert logged["perf/mfu"] == pytest.approx({2: per_token * 128 / 1e9, 4: per_token * 128 / 1e9})


def test_memory_is_the_peak_of_each_log_interval(tmp_path, data_cache, monkeypatch):
    """Step 1 holds 256 MiB more for a moment: the first interval's perf/memory_bytes is at least
    the resident memory measured then, the second's (steps 3-4) is below it by most of the
    256 MiB, and the run's peak (TrainResult.peak_memory_bytes) is the first's. Before, the
    logged number was the process's peak since it started, the same in both intervals."""
    import torch

    from pretrain.peak_memory import memory_status

    real_objective, calls, held = build_module.training_objective, {"n": 0}, {}

    def objective(logits, targets, z_weight):
        calls["n"] += 1
        if calls["n"] == 1:
            block = torch.ones(64 * 2**20)  # 256 MiB, written
            held["rss"] = memory_status()["VmRSS"]
            del block
        return real_objective(logits, targets, z_weight)

    monkeypatch.setattr(build_module, "training_objective", objective)
    result = train(tiny_config(tmp_path / "run", data_cache, "train.max_steps=4", "train.log_every=2"))
    memory = scalars(tmp_path / "run")["perf/memory_bytes"]
    # within 1 MiB: the kernel's resident-page counts are per-CPU approximations (measured 155 KiB apart)
    assert memory[2] >= held["rss"] - 2**20
    assert memory[4] < held["rss"] - 192 * 2**20
    assert result.peak_memory_bytes >= memory[2]


def test_slot_statistics_are_logged_at_the_last_step(tmp_path, data_cache):
    """slots.log_every=2 and 3 steps: the slot scalars are logged at steps 2 and 3, the last
    step's equal to the counts of the slot table the run saved at step 3 (used fraction, tokens).
    Before, the slot cadence had no last step: the run's final state was never logged."""
    from pretrain.slots import load_table

    train(tiny_config(tmp_path / "run", data_cache, "train.max_steps=3", "slots.log_every=2"))
    logged = scalars(tmp_path / "run")
    assert sorted(logged["slots/layers.1/used_fraction"]) == [2, 3]
    table = load_table(tmp_path / "run" / "checkpoints")
    assert table.step == 3
    counts = table.counts["layers.1"]
    assert logged["slots/layers.1/used_fraction"][3] == pytest.approx((counts > 0).sum().item() / counts.numel())
    assert logged["slots/num_tokens"][3] == table.num_tokens


def test_loss_mean_is_the_mean_of_the_interval_s_applied_steps(tmp_path, data_cache, monkeypatch):
    """log_every=2 over 5 steps, step 3 skipped (a NaN loss): train/loss_mean is the mean of the
    applied steps' losses of each interval (steps 1-2, 4, 5), train/loss the logging step's."""
    real_objective, calls = build_module.training_objective, {"n": 0}

    def poisoned(logits, targets, z_weight):
        calls["n"] += 1
        out = real_objective(logits, targets, z_weight)
        if calls["n"] != 5:  # step 3, first micro-batch (2 per step)
            return out
        return out._replace(loss=out.loss * float("nan"), total=out.total * float("nan"))

    monkeypatch.setattr(build_module, "training_objective", poisoned)
    cfg = tiny_config(tmp_path / "run", data_cache, "train.max_steps=5", "train.log_every=2", "train.nan_policy=skip")
    result = train(cfg)
    assert result.skipped_steps == 1
    one, two, four, five = result.losses  # the applied steps'
    logged = scalars(tmp_path / "run")
    assert logged["train/loss_mean"] == pytest.approx({2: (one + two) / 2, 4: four, 5: five})
    assert logged["train/loss"] == pytest.approx({2: two, 4: four, 5: five})


def test_a_stop_logs_the_steps_since_the_last_log(tmp_path, data_cache):
    """train.stop_after=3 with log_every=2 and slots.log_every=2, then a resume to step 4: step 3
    is logged (its loss, the loss mean of step 3 alone) before the stop. Before, it never was: the
    stopped run had logged step 2, the resumed one logs from step 4 on. The slot statistics are not
    logged at the stop: their interval 3-4 is logged whole at step 4, and the slot table, coverage
    history included, equals an uninterrupted run's bit for bit (a slot log at the stop added a
    history entry at step 3, which the SLURM preemption test caught)."""
    from safetensors.torch import load_file

    opts = ("train.max_steps=4", "train.log_every=2", "slots.log_every=2")
    first = train(tiny_config(tmp_path / "run", data_cache, *opts, "train.stop_after=3"))
    second = train(tiny_config(tmp_path / "run", data_cache, *opts))
    losses = dict(zip([1, 2, 3, 4], first.losses + second.losses))
    logged = scalars(tmp_path / "run")
    assert logged["train/loss"] == pytest.approx({2: losses[2], 3: losses[3], 4: losses[4]})
    assert logged["train/loss_mean"] == pytest.approx({2: (losses[1] + losses[2]) / 2, 3: losses[3], 4: losses[4]})
    assert sorted(logged["slots/layers.1/used_fraction"]) == [2, 4]
    whole = train(tiny_config(tmp_path / "whole", data_cache, *opts))
    resumed, uninterrupted = load_file(second.slot_table), load_file(whole.slot_table)
    assert resumed["history.step"].tolist() == [2, 4]
    assert sorted(resumed) == sorted(uninterrupted)
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
