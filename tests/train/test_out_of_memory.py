"""A rank that runs out of memory: the CLI names where, what was in use, the intact checkpoint and
the overrides that lower the memory per rank (each valid for the run), and nothing is lost."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch

from pretrain.checkpoint import latest_checkpoint
from pretrain.config import load_config
from pretrain.out_of_memory import remedies
from pretrain.train import main, train
from pretrain.trainer import Trainer
from tests.train.helpers import TINY, assert_nothing_lost, file_hashes, tiny_config


def settings(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def test_remedies_are_valid_overrides_for_the_run():
    cfg = settings("train.global_batch=64", "train.micro_batch=8", "train.zero_stage=1", "model.memory.v_dim=48")
    fixes = remedies(cfg, world_size=2)
    assert [f.split(" ")[0] for f in fixes] == [
        "train.micro_batch=4",  # 7, 6, 5 do not divide 64 / 2 ranks
        "train.activation_checkpointing=full",
        "train.zero_stage=2",
        "model.memory.parallel_size=2",
    ]
    assert "the global batch 64 stays, through 8 micro-batches per step and rank" in fixes[0]
    for fix in fixes:  # each one loads as an override, and the run stays valid
        key_value = fix.split(" ")[0]
        changed = settings("train.global_batch=64", "train.micro_batch=8", "model.memory.v_dim=48", key_value)
        assert changed.train.global_batch == 64
    # the world of 6 takes a memory-parallel size dividing both it and the value dim 48
    assert "model.memory.parallel_size=2" in " ".join(remedies(cfg, world_size=6))
    odd = settings("model.memory.v_dim=45")
    assert not any("parallel_size" in f for f in remedies(odd, world_size=2))  # 45 has no divisor <= 2
    assert "model.memory.parallel_size=3" in " ".join(remedies(odd, world_size=3))


def test_a_run_at_its_limits_is_told_so():
    cfg = settings(
        "train.global_batch=8", "train.micro_batch=1", "train.activation_checkpointing=full", "model.memory.layers=[]"
    )
    assert remedies(cfg, world_size=8) == [
        "train.zero_stage=1 (shards the optimizer states over the 8 ranks; in a new run: "
        "a resume switches only between stages 1 and 2)"
    ]
    assert (
        remedies(settings("train.micro_batch=1", "train.global_batch=1", "train.activation_checkpointing=full"), 1)
        == []
    )


def test_a_large_slot_sample_is_named_first():
    """slots.sample_batches=10**12 ran out of host memory at the first step (8 TB asked) and was told to
    lower train.micro_batch or recompute activations, not the setting that asked for it. The reference:
    the bytes a BackgroundSample's buffers hold per entry once it is offered a micro-batch of this run's
    shapes (B*S, heads, k slot ids per memory layer, (B, S) document ids)."""
    from pretrain.slots.sample import BackgroundSample

    cfg = settings("train.global_batch=4", "train.micro_batch=4")
    memory, tokens = cfg.model.memory, cfg.train.micro_batch * cfg.data.seq_len
    sample = BackgroundSample(capacity=3, layer_names=[f"layers.{i}" for i in memory.layers])
    indices = [torch.zeros(tokens, memory.heads, memory.k, dtype=torch.int64) for _ in memory.layers]
    sample.offer(0, indices, torch.zeros(cfg.train.micro_batch, cfg.data.seq_len, dtype=torch.int64))
    buffers = [*sample.indices.values(), sample.doc_ids]
    per_batch = sum(t.numel() * t.element_size() for t in buffers) // 3
    assert not any(f.startswith("slots.") for f in remedies(cfg, 1))  # no sample by default
    cfg.slots.sample_batches = 2**20 * 1024 // per_batch + 1  # a little over 1 GiB
    assert remedies(cfg, 1)[0] == (
        f"slots.sample_batches=0 (now {cfg.slots.sample_batches}; its background sample of slot indices holds "
        "about 1.0 GiB of host memory)"
    )
    cfg.slots.sample_batches = 100  # small: named last, in MiB
    assert remedies(cfg, 1)[-1].endswith(f"holds about {100 * per_batch / 2**20:,.1f} MiB of host memory)")


def oom_at(call: int):
    """A Trainer.forward_backward that raises CUDA's out-of-memory error at its call-th call."""
    real, calls = Trainer.forward_backward, {"n": 0}

    def forward_backward(self, batch, last_micro_batch, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total...")
        return real(self, batch, last_micro_batch, **kwargs)

    return forward_backward


def test_out_of_memory_in_a_step_is_explained_and_loses_nothing(tmp_path, data_cache, monkeypatch, capsys):
    run = tmp_path / "run"
    args = [*TINY, f"train.run_dir={run}", f"data.cache_dir={data_cache}", "train.checkpoint_every=2"]
    assert train(load_config(None, [*args, "train.max_steps=2"])).step == 2
    before = file_hashes(run / "checkpoints")
    # 2 micro-batches per step: the resumed run's 2nd call is the 2nd micro-batch of step 3
    monkeypatch.setattr(Trainer, "forward_backward", oom_at(2))
    assert main([*args, "train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "error: rank 0 ran out of cpu memory before this run's first step finished (start-up, resume," in err
    assert "CUDA out of memory. Tried to allocate 20.00 GiB." in err
    assert re.search(
        r"In use: peak resident memory [\d.]+ GiB since training began at step 2, [\d.]+ GiB over the run", err
    )
    assert f"Nothing was saved on the way out: the run resumes from {run / 'checkpoints' / 'step_00000002'}" in err
    assert "train.micro_batch=2 (now 4; the global batch 8 stays" in err
    assert "train.activation_checkpointing=full (now none" in err
    assert_nothing_lost(before, run / "checkpoints")
    assert latest_checkpoint(run / "checkpoints").name == "step_00000002"

    monkeypatch.setattr(Trainer, "forward_backward", oom_at(3))  # the first micro-batch of step 4
    assert main([*args, "train.max_steps=6"]) == 2
    err = capsys.readouterr().err
    assert "error: rank 0 ran out of cpu memory after log at step 3: CUDA out of memory" in err
    # the peak quoted is the interval's, which the log at step 3 restarted
    assert re.search(r"In use: peak resident memory [\d.]+ GiB since the log at step 3, [\d.]+ GiB over the run", err)
    assert_nothing_lost(before, run / "checkpoints")
    assert latest_checkpoint(run / "checkpoints").name == "step_00000002"


def test_out_of_memory_at_start_up_is_explained(tmp_path, data_cache, monkeypatch, capsys):
    import pretrain.build as build_module

    def build_model(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: ...")

    monkeypatch.setattr(build_module, "build_model", build_model)
    cfg = tiny_config(tmp_path / "run", data_cache)
    assert main([*TINY, f"train.run_dir={cfg.train.run_dir}", f"data.cache_dir={data_cache}"]) == 2
    err = capsys.readouterr().err
    assert "ran out of cpu memory before this run's first step finished" in err and ": [enforce fail at" in err
    assert "the run has no checkpoint yet" in err


def test_other_runtime_errors_pass_through(tmp_path, data_cache, monkeypatch):
    def broken(self, batch, last_micro_batch, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(Trainer, "forward_backward", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main([*TINY, f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={data_cache}", "train.max_steps=2"])


def test_remedies_read_only_the_config():
    cfg = SimpleNamespace(
        train=SimpleNamespace(micro_batch=2, global_batch=4, activation_checkpointing="memory", zero_stage=3),
        model=SimpleNamespace(memory=SimpleNamespace(layers=[], parallel_size=1), value_dim=8),
        slots=SimpleNamespace(enabled=True, sample_batches=0),
    )
    assert [f.split(" ")[0] for f in remedies(cfg, 1)] == ["train.micro_batch=1", "train.activation_checkpointing=full"]


def test_the_cuda_message_names_the_interval_of_its_peak(monkeypatch):
    """torch's CUDA counters stubbed (no GPU here): the peak quoted is the interval's, named, beside
    the run's; before any reset (no run's tracker), since the process started."""
    from pretrain.out_of_memory import memory_in_use
    from pretrain.peak_memory import IntervalPeak

    gib, peaks = 2**30, iter([40 * 2**30, 50 * 2**30, 50 * 2**30])
    for name, fn in {
        "mem_get_info": lambda d: (1 * gib, 80 * gib),
        "memory_allocated": lambda d: 30 * gib,
        "max_memory_allocated": lambda d: next(peaks),
        "memory_reserved": lambda d: 60 * gib,
        "get_device_name": lambda d: "NVIDIA H100 80GB HBM3",
        "reset_peak_memory_stats": lambda d: None,
    }.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    device = torch.device("cuda", 0)
    memory = IntervalPeak(device)
    memory.reset("the log at step 40")  # reads 40 GiB: the run's peak so far
    assert memory_in_use(device, memory) == (
        "30.00 GiB allocated by torch (peak 50.00 GiB since the log at step 40, 50.00 GiB over the run; "
        "60.00 GiB reserved), 1.00 GiB free of 80.00 GiB on NVIDIA H100 80GB HBM3"
    )
    assert "(peak 50.00 GiB since the process started; 60.00 GiB reserved)" in memory_in_use(device)
