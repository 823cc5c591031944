"""The training loop: `python -m pretrain.train --config configs/tiny.yaml key=value ...`.

Reads top to bottom: build (model, value pool, DeepSpeed engine, data, slot counters),
resume from the run directory's latest checkpoint, then while step < max_steps:
batch, forward, backward, step, count slot accesses, log, evaluate, checkpoint, check
the stop signal. No callback framework.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.profiler import record_function

from pretrain.checkpoint import Checkpointer, latest_checkpoint, rng_state, set_rng_state
from pretrain.config import ConfigError, RunConfig, load_config, save_config, validate
from pretrain.data.errors import DataError
from pretrain.distributed import DistInfo, init_distributed
from pretrain.metrics import MetricsLogger, device_peak_flops, memory_allocated, mfu
from pretrain.model import Transformer, flops_per_token, language_model_loss
from pretrain.optim import build_dense_optimizer, lr_multiplier, set_learning_rate


class TrainingDiverged(RuntimeError):
    """A non-finite loss under nan_policy=stop (or too many skipped steps); a checkpoint was saved."""


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    skipped_steps: int
    losses: list[float] = field(default_factory=list)  # per step, in order, this run only
    step_times: list[float] = field(default_factory=list)  # seconds per step (batch to update), this run
    first_loss: float | None = None
    eval: dict = field(default_factory=dict)
    checkpoint: str | None = None
    slot_table: str | None = None
    stopped_by_signal: bool = False
    requeued: bool = False


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    t = cfg.train
    return {
        "train_batch_size": t.global_batch,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.global_batch // (t.micro_batch * world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.dtype == "bf16"},
        "fp16": {"enabled": t.dtype == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_dataset(cfg: RunConfig, info: DistInfo) -> Path:
    """The prepared dataset: `data.dir` (checked), or the embedded corpus, built once by rank 0."""
    from pretrain.data import prepare_embedded_dataset

    if info.is_main:
        path = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=True)
    _barrier()
    if not info.is_main:  # finds rank 0's cached build
        path = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
    return path


def build_loader(cfg: RunConfig, dataset_dir: Path, split: str, rank: int, world_size: int, loop: bool):
    from pretrain.data import ShardLoader

    return ShardLoader(
        dataset_dir, split=split, batch_size=cfg.train.micro_batch, seq_len=cfg.data.seq_len,
        rank=rank, world_size=world_size, num_workers=cfg.data.num_workers if split == "train" else 0,
        seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer if split == "train" else 0,
        on_corrupt=cfg.data.on_corrupt, loop=loop,
    )


def build_slot_statistics(cfg: RunConfig, model: Transformer, device: torch.device):
    if not (cfg.slots.enabled and cfg.model.memory.enabled):
        return None
    from pretrain.slots import SlotStatistics

    return SlotStatistics(
        num_slots=cfg.model.memory.num_slots, layer_names=slot_stream_names(cfg),
        granularity=cfg.slots.granularity, device=device, sample_batches=cfg.slots.sample_batches,
        seed=cfg.train.seed, streams=max(1, cfg.data.num_workers),  # one open-document table per worker
    )


def slot_stream_names(cfg: RunConfig) -> list[str]:
    """One counter per memory layer, plus one for a value table shared by several layers."""
    m = cfg.model.memory
    names = [f"layers.{i}" for i in m.layers]
    return names + (["values.0"] if m.shared_values and len(m.layers) > 1 else [])


def global_mean_loss(loss: torch.Tensor) -> tuple[float, bool]:
    """The step's loss averaged over ranks, and whether every rank's loss was finite.

    One small all-reduce: the step's only host synchronisation.
    """
    both = torch.stack([loss.float(), (~torch.isfinite(loss)).float()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(both)
        both[0] /= dist.get_world_size()
    value, nonfinite = both.tolist()
    return value, nonfinite == 0


def train(cfg: RunConfig) -> TrainResult:
    """Run (or resume) the training described by `cfg`; every rank calls it."""
    from pretrain.slurm import StopSignal

    # Installed first: a preemption signal during start-up must not kill the task, and
    # data-loader workers started later inherit the handler.
    stop = StopSignal()
    try:
        return _train(cfg, stop)
    finally:
        stop.close()


def _train(cfg: RunConfig, stop) -> TrainResult:
    # ---- build -------------------------------------------------------------------------
    info = init_distributed()
    validate(cfg, world_size=info.world_size, device_type=info.device.type)
    import deepspeed

    from pretrain.data import Tokenizer, load_probes
    from pretrain.evaluate import encode_probes, fact_recall, validation_loss
    from pretrain.model.lookups import LookupRecorder
    from pretrain.parallel import MemoryParallel, init_memory_groups
    from pretrain.parallel.activation_checkpointing import apply_activation_checkpointing
    from pretrain.parallel.compile import apply_compile
    from pretrain.slurm import requeue_job

    t, device = cfg.train, info.device
    run_dir = Path(t.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    dataset_dir = prepare_dataset(cfg, info)
    tokenizer = Tokenizer(dataset_dir / "tokenizer.model")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer in {dataset_dir} has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}: raise model.vocab_size to at least {tokenizer.vocab_size}"
        )

    # Built on the meta device so that no rank ever holds the full value pool: the
    # value tables are replaced by this rank's column shards, then the dense part is
    # materialised. Same seed on every rank: identical dense weights, nothing broadcast.
    with torch.device("meta"):
        model = Transformer(cfg.model)
    groups = init_memory_groups(cfg.model.memory.parallel_size)
    values = MemoryParallel(model, groups, cfg.optim, kernel=cfg.model.memory.kernel, device=device)
    model.to_empty(device=device)
    seed_everything(t.seed)
    model.reset_parameters()
    if t.compile:
        apply_compile(model)
    apply_activation_checkpointing(model, t.activation_checkpointing, t.activation_checkpointing_layers)
    optimizer = build_dense_optimizer(model, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, info.world_size)
    )
    memory_layers = model.memory_layers()
    shared_table_stream = len(slot_stream_names(cfg)) > len(memory_layers)
    lookups = LookupRecorder(memory_layers) if cfg.slots.enabled else None
    train_loader = build_loader(cfg, dataset_dir, "train", info.rank, info.world_size, loop=True)
    stats = build_slot_statistics(cfg, model, device)
    seen_facts = [p for p in load_probes(dataset_dir) if not p.is_new_fact]  # new facts are never trained on
    probes = encode_probes(seen_facts[: t.probe_limit], tokenizer, cfg.data.seq_len)
    checkpointer = Checkpointer(run_dir, info.rank, t.keep_checkpoints)
    metrics = MetricsLogger(run_dir / "tensorboard", enabled=info.is_main)
    flops = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    peak = device_peak_flops(device)
    tokens_per_step = t.global_batch * cfg.data.seq_len
    gas = t.global_batch // (t.micro_batch * info.world_size)
    result = TrainResult(step=0, tokens_seen=0, skipped_steps=0)

    # ---- resume --------------------------------------------------------------------------
    resume_from = latest_checkpoint(checkpointer.root)
    if resume_from is not None:
        client, rank_state = checkpointer.load(resume_from, engine, values, cfg)
        result.step, result.tokens_seen = client["step"], client["tokens_seen"]
        result.skipped_steps = client.get("skipped_steps", 0)
        train_loader.load_state_dict(rank_state["data"])
        if stats is not None and "slots" in rank_state:
            stats.load_state_dict(rank_state["slots"])
        set_rng_state(rank_state["rng"])
        metrics.line(f"resumed from {resume_from} at step {result.step}")

    @record_function("eval")
    def evaluate() -> dict:
        engine.eval()
        val_loader = build_loader(cfg, dataset_dir, "val", 0, 1, loop=True)
        batches = [batch for batch, _ in zip(val_loader, range(t.eval_batches))]
        out = validation_loss(engine, batches, device)
        if probes is not None:
            out.update(fact_recall(engine, probes, device))
        engine.train()
        return out

    def save_checkpoint() -> Path:
        rank_state = {"data": train_loader.state_dict(), "rng": rng_state()}
        if stats is not None:
            rank_state["slots"] = stats.state_dict()
        client = {"step": result.step, "tokens_seen": result.tokens_seen, "skipped_steps": result.skipped_steps}
        path = checkpointer.save(result.step, engine, values, client, rank_state, cfg, write_extra=save_slot_table)
        result.checkpoint = str(path)
        if stats is not None:
            result.slot_table = str(path / "slot_frequencies.safetensors")
        return path

    def save_slot_table(folder: Path) -> None:
        if stats is None:
            return
        from pretrain.slots import model_config_hash, save_table

        reduced = stats.reduce(close_interval=False)
        if info.is_main:
            save_table(folder / "slot_frequencies.safetensors", reduced, {
                "model_config_hash": model_config_hash(cfg.model),
                "tokenizer_hash": tokenizer.sha256,
            })

    # ---- loop ----------------------------------------------------------------------------
    train_iter = iter(train_loader)
    interval_start, interval_steps = time.perf_counter(), 0
    try:
        while result.step < t.max_steps:
            step_start = time.perf_counter()
            multiplier = lr_multiplier(result.step, cfg.optim, t.max_steps)
            losses = []
            for micro_step in range(gas):
                batch = next(train_iter)
                with record_function("train/forward"):  # named regions for tools/profile.py
                    logits = engine(batch.tokens.to(device))
                    loss = language_model_loss(logits, batch.targets.to(device))
                with record_function("train/backward"):
                    engine.backward(loss)
                losses.append(loss.detach())
                if stats is not None:
                    stats.update(lookups.take(shared_table_stream), batch.doc_ids.to(device))
                if micro_step < gas - 1:
                    with record_function("train/step"):
                        engine.step()  # DeepSpeed counts micro-steps here; no update before the boundary
            assert engine.is_gradient_accumulation_boundary()
            step_loss, finite = global_mean_loss(torch.stack(losses).float().mean())
            bad_step = not finite
            values.reduce_gradients()
            value_grad_norm = values.clip_grad_norm(cfg.optim.grad_clip)
            dense_grad_norm = None
            if t.zero_stage == 0 and result.step % t.log_every == t.log_every - 1:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                dense_grad_norm = float(torch.nn.utils.get_total_norm(grads))  # stage 0 records none
            if bad_step:
                optimizer.skip_next = True
            # The schedule is applied here, not by a DeepSpeed scheduler: DeepSpeed does not
            # advance its scheduler on steps it skips itself, which would shift the schedule.
            set_learning_rate(engine.optimizer, cfg.optim.lr * multiplier)
            with record_function("train/step"):
                engine.step()
                if not bad_step:
                    values.step(value_lr_multiplier(cfg, multiplier))
                values.zero_grad()
            result.step_times.append(time.perf_counter() - step_start)
            result.step += 1
            if stats is not None:
                stats.end_step(result.step)  # steps completed, as in checkpoint tags
            result.tokens_seen += tokens_per_step
            interval_steps += 1

            if bad_step:
                result.skipped_steps += 1
                metrics.line(f"step {result.step}: non-finite loss ({step_loss}); update skipped "
                             f"({result.skipped_steps} so far)")
                metrics.scalars({"train/skipped_steps": result.skipped_steps}, result.step)
                if t.nan_policy == "stop" or result.skipped_steps > t.max_skipped_steps:
                    save_checkpoint()
                    raise TrainingDiverged(
                        f"non-finite loss at step {result.step} (train.nan_policy={t.nan_policy}, "
                        f"{result.skipped_steps} skipped); checkpoint saved in {result.checkpoint}"
                    )
            else:
                result.losses.append(step_loss)
                if result.first_loss is None:
                    result.first_loss = result.losses[-1]

            if result.step % t.log_every == 0 or result.step == t.max_steps:
                elapsed = time.perf_counter() - interval_start
                grad_norm = dense_grad_norm if dense_grad_norm is not None else engine.get_global_grad_norm()
                log_progress(metrics, cfg, result, multiplier, grad_norm, value_grad_norm,
                             tokens_per_s=interval_steps * tokens_per_step / max(elapsed, 1e-9),
                             step_time=time.perf_counter() - step_start, flops=flops, peak=peak,
                             world_size=info.world_size, device=device)
                interval_start, interval_steps = time.perf_counter(), 0

            if stats is not None and result.step % cfg.slots.log_every == 0:
                log_slot_statistics(stats, metrics, result.step)

            if result.step % t.eval_every == 0 or result.step == t.max_steps:
                result.eval = evaluate()
                metrics.scalars({f"eval/{k}": v for k, v in result.eval.items()}, result.step)
                metrics.line("eval " + " ".join(f"{k} {v:.4f}" for k, v in result.eval.items()))

            if result.step % t.checkpoint_every == 0 or result.step == t.max_steps:
                save_checkpoint()

            signalled = stop.should_stop()
            if signalled or result.step == t.stop_after:
                if result.checkpoint is None or not result.checkpoint.endswith(f"{result.step:08d}"):
                    save_checkpoint()
                metrics.line(f"stopping at step {result.step} ({'signal' if signalled else 'train.stop_after'}); "
                             f"checkpoint {result.checkpoint}")
                result.stopped_by_signal = signalled
                if signalled and stop.requeue:  # USR1 (preemption); SIGTERM means cancel
                    result.requeued = requeue_job()  # last: a requeue cancels this job at once
                break
    finally:
        metrics.close()
    return result


def log_progress(metrics: MetricsLogger, cfg: RunConfig, result: TrainResult, multiplier: float, grad_norm,
                 value_grad_norm, tokens_per_s: float, step_time: float, flops: float, peak: float | None,
                 world_size: int, device: torch.device) -> None:
    """TensorBoard scalars and the one-line console summary of the last logging interval."""
    utilisation = mfu(flops, tokens_per_s, world_size, peak)
    scalars = {
        "train/loss": result.losses[-1] if result.losses else float("nan"),
        "train/lr_dense": cfg.optim.lr * multiplier,
        "train/lr_values": cfg.optim.value_lr * value_lr_multiplier(cfg, multiplier),
        "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
        "train/value_grad_norm": float(value_grad_norm),
        "perf/tokens_per_s": tokens_per_s,
        "perf/step_time_s": step_time,
        "perf/mfu": utilisation,
        "perf/memory_bytes": memory_allocated(device),
        "train/tokens_seen": result.tokens_seen,
    }
    metrics.scalars(scalars, result.step)
    metrics.line(
        f"step {result.step}/{cfg.train.max_steps} loss {scalars['train/loss']:.4f} "
        f"lr {scalars['train/lr_dense']:.2e} grad_norm {_fmt(scalars['train/grad_norm'])} "
        f"tok/s {tokens_per_s:,.0f} mfu {_fmt(utilisation, percent=True)}"
    )


def value_lr_multiplier(cfg: RunConfig, dense_multiplier: float) -> float:
    """The value pool follows the dense schedule, or keeps optim.value_lr fixed."""
    return dense_multiplier if cfg.optim.value_lr_schedule == "cosine" else 1.0


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def log_slot_statistics(stats, metrics: MetricsLogger, step: int) -> None:
    """Slot usage over all ranks, cumulative and since the last call (a collective)."""
    reduced = stats.reduce(close_interval=True)
    metrics.scalars(reduced.summary(interval=True), step)
    for name, hist in reduced.histograms().items():
        metrics.histogram(name, hist, step)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def parse_args(argv=None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv=None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
        result = train(cfg)
    except (ConfigError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    if dist.is_initialized():
        # A clean shutdown: a rank that exits while the process group's threads still run
        # can abort in C++ ("terminate called without an active exception"), failing the job.
        dist.barrier()
        rank = dist.get_rank()
        dist.destroy_process_group()
    else:
        rank = 0
    if rank == 0:
        if result.stopped_by_signal:
            print(f"stopped at step {result.step} by signal; checkpoint {result.checkpoint}; "
                  f"{'requeued' if result.requeued else 'not requeued'}")
        else:
            print(f"finished at step {result.step}; checkpoint {result.checkpoint}")
    return 0


def cli() -> None:
    """`python -m pretrain.train` / `memlayers-train`: main(), then exit without interpreter teardown.

    By then the process group is destroyed and every checkpoint, table and event file is
    closed; what teardown would still do is destroy C++ objects of gloo and DeepSpeed's
    shared-memory op, where a rank occasionally aborts ("terminate called without an
    active exception"), failing a finished job under srun.
    """
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
