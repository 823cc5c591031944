"""The training loop in one process: resume exactness, NaN policies, interrupted checkpoints."""

from __future__ import annotations

import errno

import pytest
import torch

import pretrain.build as build_module
from pretrain.checkpoint import CheckpointError, latest_checkpoint
from pretrain.config import ConfigError, check_runtime, load_config, validate
from pretrain.train import train
from pretrain.trainer import TrainingDiverged
from tests.train.helpers import assert_resume_is_exact, final_parameters, tiny_config


@pytest.mark.parametrize("workers,memory", [(0, True), (2, True), (0, False)], ids=["memory", "workers2", "dense"])
def test_resume_is_exact(tmp_path, data_cache, workers, memory):
    opts = ("train.max_steps=6", f"data.num_workers={workers}", *([] if memory else ["model.memory.layers=[]"]))
    # a model without memory layers has no value shards and no slot tables
    assert_resume_is_exact(tmp_path, data_cache, opts, stop_after=3, steps=6, tables=memory)


def test_a_resumed_run_with_data_workers_draws_what_an_uninterrupted_run_draws(tmp_path, data_cache, monkeypatch):
    """An RNG consumer in the loop (dropout on the logits here) draws the same numbers after a resume
    as the uninterrupted run at those steps: the losses are bitwise equal. Before, starting the
    loader's DataLoader workers drew their base seed from the global torch generator, once per run:
    the resumed run's draws after its restored state were shifted by one."""
    import torch.nn.functional as F

    real_objective = build_module.training_objective

    def with_dropout(logits, targets, z_weight):
        return real_objective(F.dropout(logits, p=0.5, training=True), targets, z_weight)

    monkeypatch.setattr(build_module, "training_objective", with_dropout)
    opts = ("train.max_steps=4", "data.num_workers=2")
    straight = train(tiny_config(tmp_path / "a", data_cache, *opts))
    first = train(tiny_config(tmp_path / "b", data_cache, *opts, "train.stop_after=2"))
    second = train(tiny_config(tmp_path / "b", data_cache, *opts))
    assert first.losses + second.losses == straight.losses


def test_a_finished_run_started_again_names_its_checkpoint(tmp_path, data_cache):
    """Nothing left to train: the result names the checkpoint and slot table it resumed from (it
    said 'checkpoint None'), and the run directory is as it was."""
    cfg = tiny_config(tmp_path / "run", data_cache, "train.max_steps=2")
    first = train(cfg)
    again = train(cfg)
    assert again.step == 2 and again.losses == []
    assert again.checkpoint == first.checkpoint == str(tmp_path / "run" / "checkpoints" / "step_00000002")
    assert again.slot_table == first.slot_table


def test_loss_falls_on_embedded_corpus(tmp_path, data_cache):
    result = train(tiny_config(tmp_path / "run", data_cache, "train.max_steps=30", "optim.lr=1e-2"))
    assert result.step == 30
    assert sum(result.losses[-5:]) / 5 < sum(result.losses[:5]) / 5 - 0.5
    assert set(result.eval) >= {"val_loss", "val_perplexity", "fact_recall", "fact_recall_chance"}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    scalars = set(board.Tags()["scalars"])
    expected = {
        "train/loss",
        "train/lr_dense",
        "train/lr_values",
        "train/grad_norm",
        "train/value_grad_norm",
        "perf/tokens_per_s",
        "perf/step_time_s",
        "perf/memory_bytes",
        "perf/data_wait_fraction",
        "eval/val_loss",
        "eval/val_perplexity",
        "eval/fact_recall",
        "slots/layers.1/used_fraction",
        "slots/layers.1/interval/entropy",
        "slots/layers.1/kl_uniform",
        "slots/layers.1/top1pct_share",
    }
    assert expected <= scalars, expected - scalars
    assert "perf/mfu" not in scalars  # n/a on CPU: not logged rather than a made-up number
    assert any(tag.startswith("slots/layers.1/") for tag in board.Tags()["histograms"])
    losses = [e.value for e in board.Scalars("train/loss")]
    assert losses == pytest.approx(result.losses[: len(losses)])


@pytest.mark.parametrize("policy", ["skip", "stop"])
def test_nonfinite_loss(tmp_path, data_cache, monkeypatch, policy):
    real_objective = build_module.training_objective
    calls = {"n": 0}

    def poisoned(logits, targets, z_weight):
        calls["n"] += 1
        out = real_objective(logits, targets, z_weight)
        if calls["n"] != 5:  # step 3, first micro-batch (gas=2)
            return out
        return out._replace(loss=out.loss * float("nan"), total=out.total * float("nan"))

    monkeypatch.setattr(build_module, "training_objective", poisoned)
    cfg = tiny_config(tmp_path / policy, data_cache, "train.max_steps=5", f"train.nan_policy={policy}")
    if policy == "skip":
        result = train(cfg)
        assert result.step == 5 and result.skipped_steps == 1
        assert len(result.losses) == 4 and all(torch.isfinite(torch.tensor(result.losses)))
    else:
        with pytest.raises(TrainingDiverged, match="non-finite loss at step 3"):
            train(cfg)
        ckpt = latest_checkpoint(tmp_path / policy / "checkpoints")
        assert ckpt.name == "step_00000003"
        params = final_parameters(tmp_path / policy)
        assert all(torch.isfinite(v.float()).all() for v in params.values())


@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_a_skipped_step_counts_no_slot_accesses(tmp_path, data_cache, monkeypatch, capsys, poison):
    """Step 3 is skipped, for a NaN loss or for an infinite gradient under a finite loss: the slot
    table holds the accesses of the other 4 steps, against a hand count from a hook on the memory
    layer's training forwards (2 per step), and the log names the reason."""
    from pretrain.slots import load_table

    real_objective, calls, reads = build_module.training_objective, {"n": 0}, []

    def poisoned(logits, targets, z_weight):
        calls["n"] += 1
        out = real_objective(logits, targets, z_weight)
        if calls["n"] != 5 or poison != "loss":  # step 3, first micro-batch (gas=2)
            return out
        return out._replace(loss=out.loss * float("nan"), total=out.total * float("nan"))

    build = build_module.build_model
    backwards = {"n": 0}

    def infinite_at_step_3(grad):
        backwards["n"] += 1
        return grad * float("inf") if backwards["n"] == 5 else grad

    def record(*args, **kwargs):
        model, *rest = build(*args, **kwargs)
        for block in model.memory_layers():
            block.register_lookup_hook(lambda layer, idx, w: reads.append(idx.clone()) if layer.training else None)
        if poison == "gradient":
            model.output.weight.register_hook(infinite_at_step_3)
        return (model, *rest)

    monkeypatch.setattr(build_module, "training_objective", poisoned)
    monkeypatch.setattr(build_module, "build_model", record)
    cfg = tiny_config(
        tmp_path / "run", data_cache, "train.max_steps=5", "train.nan_policy=skip", "slots.granularity=sequence"
    )
    result = train(cfg)
    assert result.skipped_steps == 1 and len(result.losses) == 4 and len(reads) == 10
    reason = "non-finite loss" if poison == "loss" else "non-finite gradients"
    assert f"step 3: {reason}" in capsys.readouterr().out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged = {e.step: e.value for e in board.Scalars("train/loss")}  # step 3 had none (it showed step 2's)
    assert list(logged) == [1, 2, 4, 5] and list(logged.values()) == pytest.approx(result.losses, rel=1e-6)
    applied = reads[:4] + reads[6:]  # forwards 5 and 6 were step 3's
    table = load_table(tmp_path / "run" / "checkpoints")
    counts = torch.bincount(torch.cat([i.reshape(-1) for i in applied]), minlength=table.num_slots)
    assert torch.equal(table.counts["layers.1"], counts)
    assert table.num_tokens == sum(i.shape[0] for i in applied) == 4 * 8 * 32
    # tokens_seen counts the positions trained on, the table the tokens read (equal here: no padding),
    # neither the skipped step's (before: 5 x 256)
    assert result.tokens_seen == table.num_tokens
    seen = {e.step: e.value for e in board.Scalars("train/tokens_seen")}
    assert seen == {1: 256, 2: 512, 3: 512, 4: 768, 5: 1024}


def test_failed_checkpoint_write_keeps_previous(tmp_path, data_cache, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(run, data_cache, "train.max_steps=2"))
    before = latest_checkpoint(run / "checkpoints")
    assert before.name == "step_00000002"
    before_params = final_parameters(run)

    from pretrain.slots.checkpoint_item import SlotTableWriter

    def crash_midway(self, folder):  # the last item of a checkpoint, after the engine's and the ranks' files
        raise OSError(errno.ENOSPC, "No space left on device (simulated)", str(folder / "slot_frequencies"))

    monkeypatch.setattr(SlotTableWriter, "write", crash_midway)
    with pytest.raises(CheckpointError) as refused:
        train(tiny_config(run, data_cache, "train.max_steps=4"))
    assert str(refused.value).startswith(
        f"rank 0 could not write checkpoint step_00000004 in {run / 'checkpoints'} (its filesystem is full: "
    )
    assert f"{run / 'checkpoints' / 'latest'} still names step_00000002, which is complete" in str(refused.value)
    assert "the run resumes from step_00000002" in str(refused.value)
    failed_file = run / "checkpoints" / ".tmp-step_00000004" / "slot_frequencies"
    assert str(refused.value).endswith(f"the run resumes from step_00000002. The file: {failed_file}")
    assert latest_checkpoint(run / "checkpoints") == before
    after_params = final_parameters(run)
    assert all(torch.equal(before_params[k], after_params[k]) for k in before_params)
    monkeypatch.undo()
    # what a killed process's atomic writes leave: a `latest` and a universal conversion half written
    (run / "checkpoints" / ".latest.tmp-999-dead").write_text("step_00000004")
    (run / "checkpoints" / "..tmp-universal-step_00000002.tmp-999-dead").mkdir()
    resumed = train(tiny_config(run, data_cache, "train.max_steps=4"))  # resumes from step 2
    assert resumed.step == 4 and len(resumed.losses) == 2
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]


def _file_size_limit(method, limit=4096):
    """`method` run under RLIMIT_FSIZE: the kernel refuses writes past `limit` bytes in any file
    (EFBIG, as a quota refuses them), so each library raises its own error for a failed write."""
    import resource
    import signal

    def limited(*args, **kwargs):
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal ends the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return method(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    return limited


@pytest.mark.parametrize("writer", ["deepspeed", "rank file", "slot table"])
def test_a_write_the_filesystem_refuses_is_named(tmp_path, data_cache, monkeypatch, writer):
    """torch.save raises RuntimeError for a failed write ('[enforce fail at inline_container.cc:672]
    . unexpected pos ...') and safetensors SafetensorError ('I/O error: ... (os error 28)'), not
    OSError: a real full disk (measured on a 41 MiB tmpfs) ended the run in DeepSpeed's traceback,
    exit status 1, not in the message naming the checkpoint kept."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    import pretrain.checkpoint.checkpointer as checkpoint_module
    from pretrain.slots.checkpoint_item import SlotTableWriter

    run = tmp_path / "run"
    train(tiny_config(run, data_cache, "train.max_steps=2"))
    target, name = {
        "deepspeed": (TorchCheckpointEngine, "save"),
        "rank file": (checkpoint_module, "_atomic_torch_save"),
        "slot table": (SlotTableWriter, "write"),
    }[writer]
    monkeypatch.setattr(target, name, _file_size_limit(getattr(target, name)))
    with pytest.raises(CheckpointError, match=r"^rank 0 could not write checkpoint step_00000004 in ") as refused:
        train(tiny_config(run, data_cache, "train.max_steps=4"))
    assert "still names step_00000002, which is complete" in str(refused.value)
    # the errno where a writer tells it (safetensors' text, torch through a file object); torch's
    # writer to a path drops it, and with room left it is not called a full disk
    said = {
        "deepspeed": "(the filesystem refused a write (",
        "rank file": "(a file grew past the size limit of this process (ulimit -f))",
        "slot table": "(a file grew past the size limit of this process (ulimit -f))",
    }[writer]
    assert said in str(refused.value)
    assert latest_checkpoint(run / "checkpoints").name == "step_00000002"


def test_incompatible_checkpoint_is_refused(tmp_path, data_cache):
    run = tmp_path / "run"
    train(tiny_config(run, data_cache, "train.max_steps=1"))
    with pytest.raises(ConfigError, match="model.dim"):
        train(tiny_config(run, data_cache, "train.max_steps=2", "model.dim=64"))


def test_triton_kernel_on_cpu_is_refused_at_start(monkeypatch):
    import kernels.triton_common

    monkeypatch.setattr(kernels.triton_common, "INTERPRETING", False)
    cfg = load_config("configs/tiny.yaml")
    cfg.model.memory.kernel = "triton"
    validate(cfg)  # a value check: the kernel is a valid choice anywhere
    check_runtime(cfg, device_type="cuda")
    with pytest.raises(ConfigError, match="model.memory.kernel=triton needs a CUDA device"):
        check_runtime(cfg, device_type="cpu")
    monkeypatch.setattr(kernels.triton_common, "INTERPRETING", True)  # TRITON_INTERPRET=1: allowed
    check_runtime(cfg, device_type="cpu")


def test_config_errors_before_heavy_work(tmp_path):
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config("configs/tiny.yaml", ["train.max_step=3"])
    with pytest.raises(ConfigError, match="train.zero_stage=4"):
        load_config("configs/tiny.yaml", ["train.zero_stage=4"])
    with pytest.raises(ConfigError, match="model.memory.layers"):
        load_config("configs/tiny.yaml", ["model.memory.layers=[9]"])
    dense_fp16 = load_config("configs/tiny.yaml", ["train.dtype=fp16", "model.memory.layers=[]"])
    with pytest.raises(ConfigError, match="fp16 is not supported on CPU"):
        check_runtime(dense_fp16, device_type="cpu")
    cfg = load_config("configs/tiny.yaml", ["train.global_batch=16", "train.micro_batch=16"])
    with pytest.raises(ConfigError, match="not divisible by train.micro_batch=16 x world size 3"):
        check_runtime(cfg, world_size=3)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_missing_data_dir_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match="data.dir=.*holds no manifest.json"):
        load_config("configs/tiny.yaml", [f"data.dir={tmp_path / 'nowhere'}"])


def test_fp16_with_memory_layers_is_refused_on_any_device():
    cfg = load_config("configs/tiny.yaml")
    cfg.train.dtype = "fp16"
    with pytest.raises(ConfigError, match="fp16 is not supported with memory layers"):
        validate(cfg)
    cfg.model.memory.layers = []
    check_runtime(validate(cfg), device_type="cuda")  # a dense model may use DeepSpeed's fp16 loss scaling


def test_constant_value_learning_rate(tmp_path, data_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(
        tiny_config(
            tmp_path / "run", data_cache, "train.max_steps=4", "optim.value_lr_schedule=constant", "optim.value_lr=2e-3"
        )
    )
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    assert [e.value for e in board.Scalars("train/lr_values")] == pytest.approx([2e-3] * 4)
    dense = [e.value for e in board.Scalars("train/lr_dense")]
    assert dense[0] < dense[1]  # the dense lr still warms up
    with pytest.raises(ConfigError, match="optim.value_lr_schedule"):
        load_config("configs/tiny.yaml", ["optim.value_lr_schedule=linear"])


def test_a_run_without_checkpoints_writes_none_and_trains_the_same(tmp_path, data_cache):
    """train(save_checkpoints=False), as bench_train and the profiler run it: the same losses as
    a run that saves (every step and at the last), and no checkpoint anywhere in the run dir."""
    opts = ("train.max_steps=3", "train.checkpoint_every=1")
    saved = train(tiny_config(tmp_path / "saved", data_cache, *opts))
    bare = train(tiny_config(tmp_path / "bare", data_cache, *opts), save_checkpoints=False)
    assert bare.losses == saved.losses and len(bare.losses) == 3
    assert saved.checkpoint is not None and latest_checkpoint(tmp_path / "saved" / "checkpoints") is not None
    assert bare.checkpoint is None
    assert not (tmp_path / "bare" / "checkpoints").exists() or not any((tmp_path / "bare" / "checkpoints").iterdir())


def test_the_last_log_line_has_the_dense_grad_norm(tmp_path, data_cache, monkeypatch):
    """max_steps not a multiple of log_every: the closing log line at max_steps (ZeRO 0) carries the
    dense gradient norm, equal to the norm of the gradients the step updates with, taken in float64."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.optimizers import Optimizers

    reference, real_step = {}, Optimizers.step

    def step(self, lr_multiplier, skip):  # the gradients are cleared inside the real step
        grads = [p.grad.double().flatten() for p in self.engine.module.parameters() if p.grad is not None]
        reference[len(reference) + 1] = float(torch.linalg.vector_norm(torch.cat(grads)))
        return real_step(self, lr_multiplier, skip)

    monkeypatch.setattr(Optimizers, "step", step)
    train(tiny_config(tmp_path / "run", data_cache, "train.max_steps=3", "train.log_every=2"), save_checkpoints=False)
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged = {e.step: e.value for e in board.Scalars("train/grad_norm")}
    assert logged.keys() == {2, 3}
    assert [logged[2], logged[3]] == pytest.approx([reference[2], reference[3]], rel=1e-5)


def test_the_logged_value_grad_norm_is_the_float64_norm_of_the_value_gradients(tmp_path, data_cache, monkeypatch):
    """train/value_grad_norm (and the norm the value gradients are clipped by) against the norm of
    the value shards' gradients taken in float64. The tiny table has 2M entries: a float32 norm of
    the whole table, accumulated serially on the CPU, read 8.6e-5 low; a 2^26-entry table 0.6%."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.optimizers import Optimizers

    reference, real_clip = {}, Optimizers.clip

    def clip(self):  # before the clip scales the gradients
        grads = [p.grad.double().flatten() for p in self.values.parameters() if p.grad is not None]
        reference[len(reference) + 1] = float(torch.linalg.vector_norm(torch.cat(grads)))
        return real_clip(self)

    monkeypatch.setattr(Optimizers, "clip", clip)
    overrides = ["train.max_steps=2", "train.log_every=1", "model.memory.n_keys=128", "model.memory.v_dim=128"]
    train(tiny_config(tmp_path / "run", data_cache, *overrides), save_checkpoints=False)  # 16K x 128 values
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged = {e.step: e.value for e in board.Scalars("train/value_grad_norm")}
    assert logged.keys() == {1, 2}
    # float32 in TensorBoard: 6e-8 relative rounding
    assert [logged[1], logged[2]] == pytest.approx([reference[1], reference[2]], rel=1e-6)


def test_a_model_without_memory_layers_logs_no_value_scalars(tmp_path, data_cache):
    """model.memory.layers=[] has no value tables: no train/lr_values nor train/value_grad_norm.
    Before, it logged optim.value_lr's schedule and a value gradient norm of 0 for tables it did
    not have (in TensorBoard beside a memory run, a value pool that seemed to learn nothing)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.lr_schedule import learning_rates

    cfg = tiny_config(tmp_path / "run", data_cache, "train.max_steps=2", "train.log_every=1", "model.memory.layers=[]")
    train(cfg, save_checkpoints=False)
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    scalars = set(board.Tags()["scalars"])
    assert {"train/lr_dense", "train/grad_norm", "train/loss"} <= scalars
    assert not {"train/lr_values", "train/value_grad_norm"} & scalars, scalars
    logged = [e.value for e in board.Scalars("train/lr_dense")]
    assert logged == pytest.approx([learning_rates(step, cfg)[0] for step in (0, 1)])  # the schedule's


def test_tensorboard_shows_the_resumed_run_after_a_rollback(tmp_path, data_cache):
    """A run rolled back to its step-2 checkpoint (docs/training.md: write an earlier tag into `latest`; a crash
    after the last checkpoint is the same) logs steps 3-4 again. TensorBoard must show each step
    once, the resumed run's from step 3 on. Before, it showed both runs' steps 3-4: the loss curve
    ran to step 4 and jumped back to 3 with other values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opts = ["train.max_steps=4", "train.log_every=1", "train.checkpoint_every=2", "train.keep_checkpoints=3"]
    first = train(tiny_config(tmp_path / "run", data_cache, *opts))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000002")
    # another rate after the rollback (as after a loss spike), so the two runs' steps 3-4 differ
    second = train(
        tiny_config(tmp_path / "run", data_cache, *opts, "optim.lr=1e-3", "optim.allow_schedule_change=true")
    )
    assert len(first.losses) == 4 and len(second.losses) == 2 and second.losses != first.losses[2:]
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    logged = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert [value for _, value in logged] == pytest.approx(first.losses[:2] + second.losses)


def test_squared_norm_against_float64():
    """The norm helper on a 2^24-entry tensor of small gradients: the float64 norm's square,
    where a float32 vector_norm of the whole tensor is 2.6e-4 low on the CPU."""
    from pretrain.dense_optimizer import squared_norm

    g = torch.randn(2**17, 128, generator=torch.Generator().manual_seed(0)) * 1e-5
    bias = torch.randn(7, generator=torch.Generator().manual_seed(1))
    expected = torch.linalg.vector_norm(g.double()) ** 2 + torch.linalg.vector_norm(bias.double()) ** 2
    assert squared_norm([g, bias]).dtype == torch.float64
    # each row's norm is rounded to float32 (6e-8 relative)
    assert squared_norm([g, bias]).item() == pytest.approx(expected.item(), rel=1e-7)


def test_slots_turned_on_at_a_resume_count_from_the_resume_step(tmp_path, data_cache, capsys):
    """A run resumed with slots.enabled=true from a checkpoint of slots.enabled=false counts steps
    5-8 only: its first usage line said "steps 1-6" and its table, claiming step 8, did not say
    that steps 1-4 were not counted. Now the line says "steps 5-6", the log says why, and the
    table's first_step is 4; its tokens are those of the 4 counted steps."""
    from pretrain.slots import load_table

    run = tmp_path / "run"
    train(tiny_config(run, data_cache, "train.max_steps=8", "train.stop_after=4", "slots.enabled=false"))
    capsys.readouterr()
    train(tiny_config(run, data_cache, "train.max_steps=8"))
    lines = [line.split("] ", 1)[1] for line in capsys.readouterr().out.splitlines() if "] slots " in line]
    assert [line.split(":")[0] for line in lines] == ["slots layers.1 steps 5-6", "slots layers.1 steps 7-8"]
    table = load_table(run / "checkpoints")
    assert (table.step, table.metadata["first_step"], table.history["step"].tolist()) == (8, "4", [6, 8])
    opts = tiny_config(run, data_cache)
    assert table.num_tokens == 4 * opts.train.global_batch * opts.data.seq_len


def test_slot_table_names_each_block_by_its_own_accesses(tmp_path, data_cache, monkeypatch):
    """memory.layers=[2, 0] (not in block order): the table's 'layers.<i>' counts are the slots
    block i read. Before, the counters were named in config order but fed in block order, so
    'layers.2' held block 0's counts (and sparse memory finetuning ranked by the wrong df)."""
    from pretrain.model.names import memory_layer_name
    from pretrain.slots import load_table

    reads: dict[int, list[torch.Tensor]] = {}
    build = build_module.build_model

    def record_blocks(*args, **kwargs):  # the reference: hooks keyed by block index
        model, *rest = build(*args, **kwargs)
        for b, block in enumerate(model.layers):
            if block.is_memory:
                block.ffn.register_lookup_hook(
                    lambda layer, idx, w, b=b: reads.setdefault(b, []).append(idx.clone()) if layer.training else None
                )
        return (model, *rest)

    monkeypatch.setattr(build_module, "build_model", record_blocks)
    cfg = tiny_config(
        tmp_path / "run",
        data_cache,
        "train.max_steps=1",
        "train.global_batch=4",
        "model.n_layers=3",
        "model.memory.layers=[2,0]",
        "model.memory.shared_values=false",
        "slots.granularity=sequence",
    )
    train(cfg)
    table = load_table(tmp_path / "run" / "checkpoints")
    assert sorted(reads) == [0, 2]
    for b, idx in reads.items():
        counts = torch.bincount(torch.cat([i.reshape(-1) for i in idx]), minlength=table.num_slots)
        assert torch.equal(table.counts[memory_layer_name(b)], counts), f"block {b}"
    assert not torch.equal(table.counts["layers.0"], table.counts["layers.2"])
