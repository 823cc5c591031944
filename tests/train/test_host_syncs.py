"""Host reads of device tensors in a steady-state training step (tests/host_syncs.py finds them on
the CPU): none while the micro-batches run, and only the step's justified few after them.

On a GPU each such read waits for every queued kernel, and the launches after it start from an
idle GPU. The Triton bag used to read its indices' range (two numbers), size a bincount on the
host and ask whether any row was hot: four waits per memory layer and micro-batch, 384 per step
of configs/memory_373m.yaml (3 memory layers, 32 micro-batches).
"""

from __future__ import annotations

from collections import Counter

import pytest

from pretrain.train import train
from pretrain.trainer import Trainer
from tests.host_syncs import HostSyncs
from tests.train.helpers import tiny_config

# The memory_373m setting (bf16, ZeRO 1, several micro-batches per step), at a size the Triton
# interpreter trains in seconds. Step 2 is recorded: the first step's lazy start-up is behind it,
# and no log, slot log, evaluation or checkpoint is due there (the run stops after step 3).
STEADY = (
    "train.dtype=bf16",
    "train.zero_stage=1",
    "train.global_batch=2",
    "train.micro_batch=1",
    "train.max_steps=4",
    "train.stop_after=3",
    "train.log_every=5",
    "slots.log_every=5",
    "model.memory.n_keys=8",
)
RECORDED_STEP = 2

# What the step reads after its micro-batches, by the innermost project function (a library's
# read under it counts there). Each decides something on the host before the update:
STEP_TAIL = Counter(
    {
        # the step's scored targets summed over ranks: the micro-batches' loss weights, read
        # before the first forward (nothing queued yet)
        "pretrain/distributed.py:_all_reduced": 1,
        # loss, non-finite flag and z-loss in one all-reduce: the skip decision (train.nan_policy)
        # precedes the update; the logged loss is the same read, not another
        "pretrain/trainer.py:global_step_loss": 1,
        "pretrain/optimizers.py:finite": 1,  # the value tables' gradient norm: skip on non-finite
        # DeepSpeed's ZeRO-1 bf16 step: its overflow check (1) and gradient-norm checks (3), then
        # Optimizers.step reads that norm (1) and SkippableAdamW's guard once per group (2)
        "pretrain/optimizers.py:step": 5,
        "pretrain/dense_optimizer.py:step": 2,
        "pretrain/slurm.py:should_stop": 1,  # the ranks agree on a stop signal after every step
    }
)


def record_step(monkeypatch, step: int) -> HostSyncs:
    """HostSyncs over the loop's whole iteration for `step` (from its batches to the stop check);
    the loader's work is the host's."""
    syncs = HostSyncs()
    real_step, real_stop, real_next = Trainer.train_step, Trainer.stop_requested, Trainer.next_batch

    def train_step(self, batches):
        if self.state.step == step - 1:
            syncs.__enter__()
        return real_step(self, batches)

    def next_batch(self, batches):
        with syncs.host_work():
            batch = real_next(self, batches)
        syncs.mark_host(batch.tokens, batch.targets, batch.doc_ids, getattr(batch, "streams", None))
        return batch

    def stop_requested(self):
        stop = real_stop(self)
        if self.state.step == step:
            syncs.__exit__(None, None, None)
        return stop

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(Trainer, "next_batch", next_batch)
    monkeypatch.setattr(Trainer, "stop_requested", stop_requested)
    return syncs


def project_function(site: str) -> str:
    """'path:line in name' -> 'path:name' (line numbers move with every edit)."""
    path, rest = site.split(":", 1)
    return f"{path}:{rest.split(' in ', 1)[1]}"


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_a_steady_step_reads_the_device_only_after_its_micro_batches(tmp_path, data_cache, monkeypatch, kernel):
    if kernel == "triton":
        from kernels import bag_triton

        # interpreted on the CPU; a small chunk size makes the bag's backward run its hot-row launches
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(bag_triton, "ROW_CHUNK", 16)
    syncs = record_step(monkeypatch, RECORDED_STEP)
    result = train(tiny_config(tmp_path / "run", data_cache, *STEADY, f"model.memory.kernel={kernel}"))
    assert result.step == 3 and len(result.losses) == 3
    assert syncs.syncs, "nothing recorded: the step was not watched"
    in_micro_batches = [s for s in syncs.syncs if any(" in forward_backward" in f for f in s.stack)]
    assert not in_micro_batches, "host reads in forward, backward or slot counting:\n" + syncs.report()
    tail = Counter(project_function(s.site) for s in syncs.syncs)
    assert tail == STEP_TAIL, syncs.report()
