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
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.slurm import SlurmEnvError, StopSignal  # the standard library only

# `python -m pretrain.train` (the sbatch templates): the stop handler is installed before the
# heavy imports below (seconds), so a USR1/SIGTERM during start-up is recorded, not fatal;
# train() takes it over.
_STARTUP_STOP = StopSignal() if __name__ == "__main__" else None

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import record_function  # noqa: E402

from pretrain import profiler_regions as regions  # noqa: E402
from pretrain.checkpoint import Checkpointer, CheckpointError, latest_checkpoint, rng_state, set_rng_state  # noqa: E402
from pretrain.config import ConfigError, RunConfig, check_runtime, load_config, save_config, validate  # noqa: E402
from pretrain.data.errors import DataError  # noqa: E402
from pretrain.distributed import DistInfo, barrier, init_distributed  # noqa: E402
from pretrain.metrics import MetricsLogger, device_peak_flops, memory_allocated, mfu  # noqa: E402
from pretrain.model import Transformer, flops_per_token, language_model_loss  # noqa: E402
from pretrain.model import names as model_names  # noqa: E402
from pretrain.optim import build_dense_optimizer, lr_multiplier, set_learning_rate  # noqa: E402
from pretrain.slots.table import TABLE_FILENAME  # noqa: E402


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


def prepare_dataset(cfg: RunConfig, info: DistInfo) -> list:
    """The run's data sources: `data.sources` / `data.dir` (checked), or the embedded corpus, built
    once by rank 0, as a mixture of one."""
    from pretrain.data import prepare_embedded_dataset
    from pretrain.data.sources import resolve_sources

    sources = resolve_sources(cfg.data, cfg.data.seq_len)
    if sources:
        return sources
    if info.is_main:
        path = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=True)
    barrier()
    if not info.is_main:  # finds rank 0's cached build
        path = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
    from pretrain.data.shards import read_manifest
    from pretrain.data.sources import Source

    return [Source("embedded", path, 1.0, read_manifest(path))]


def build_loader(cfg: RunConfig, dataset, split: str, rank: int, world_size: int, loop: bool):
    """Train: a `MixtureLoader` over the sources (a list); val: a `ShardLoader` of one dataset dir."""
    from pretrain.data import ShardLoader
    from pretrain.data.mixture import MixtureLoader

    if split == "train":
        return MixtureLoader(dataset, batch_size=cfg.train.micro_batch, rank=rank, world_size=world_size,
                             num_workers=cfg.data.num_workers, seed=cfg.train.seed,
                             shuffle_buffer=cfg.data.shuffle_buffer, on_corrupt=cfg.data.on_corrupt,
                             seq_len=cfg.data.seq_len)
    return ShardLoader(
        dataset, split=split, batch_size=cfg.train.micro_batch, seq_len=cfg.data.seq_len,
        rank=rank, world_size=world_size, num_workers=0, seed=cfg.train.seed, shuffle_buffer=0,
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
    return model_names.slot_stream_names(cfg.model.memory)


def global_mean_loss(loss: torch.Tensor) -> tuple[float, bool]:
    """The step's loss averaged over ranks, and whether every rank's loss was finite.

    One small all-reduce read on the host (the stop check and the Triton bag's index range
    check synchronise too).
    """
    both = torch.stack([loss.float(), (~torch.isfinite(loss)).float()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(both)
        both[0] /= dist.get_world_size()
    value, nonfinite = both.tolist()
    return value, nonfinite == 0


def train(cfg: RunConfig, stop: StopSignal | None = None) -> TrainResult:
    """Run (or resume) the training described by `cfg`; every rank calls it. `stop`: a handler
    installed earlier (it keeps any signal already received), else one is installed now."""
    # Installed first: a preemption signal during start-up must not kill the task, and
    # data-loader workers started later inherit the handler.
    stop = stop if stop is not None else StopSignal()
    try:
        return _train(cfg, stop)
    finally:
        stop.close()


def _train(cfg: RunConfig, stop) -> TrainResult:
    # ---- build -------------------------------------------------------------------------
    info = init_distributed()
    check_runtime(validate(cfg), world_size=info.world_size, device_type=info.device.type)
    import deepspeed

    from pretrain.data import Tokenizer, load_probes
    from pretrain.data.checks import check_trainable
    from pretrain.evaluate import encode_probes, fact_recall, validation_loss
    from pretrain.model.lookups import LookupRecorder
    from pretrain.parallel import MemoryParallel, init_memory_groups
    from pretrain.parallel.activation_checkpointing import apply_activation_checkpointing
    from pretrain.parallel.compile import apply_compile
    from pretrain.slurm import requeue_job

    t, device = cfg.train, info.device
    run_dir = Path(t.run_dir)
    sources = prepare_dataset(cfg, info)
    check_trainable(sources)
    dataset_dir = sources[0].dir
    tokenizer = Tokenizer(dataset_dir / "tokenizer.model")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer in {dataset_dir} has {tokenizer.vocab_size} tokens but model.vocab_size="
            f"{cfg.model.vocab_size}: raise model.vocab_size to at least {tokenizer.vocab_size}"
        )
    checkpointer = Checkpointer(run_dir, info.rank, t.keep_checkpoints)
    # Checked before anything is written or built: a damaged checkpoint is refused, naming the file.
    resume_from = latest_checkpoint(checkpointer.root)
    if resume_from is not None:
        checkpointer.verify(resume_from, cfg, info.world_size, dataset_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")

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
    train_loader = build_loader(cfg, sources, "train", info.rank, info.world_size, loop=True)
    stats = build_slot_statistics(cfg, model, device)
    metrics = MetricsLogger(run_dir / "tensorboard", enabled=info.is_main)
    metrics.line(describe_data(cfg, sources, tokenizer))
    probes = None
    with_probes = [s for s in sources if s.has_probes]
    if with_probes:  # new facts are never trained on
        seen_facts = [p for p in load_probes(with_probes[0].dir) if not p.is_new_fact]
        probes = encode_probes(seen_facts[: t.probe_limit], tokenizer, cfg.data.seq_len)
    else:
        metrics.line("data: no probes.jsonl in the data: fact recall is not evaluated (validation loss is)")
    validated = [s for s in sources if s.has_validation]
    for s in sources:
        if not s.has_validation:
            metrics.line(f"data: source {s.name} ({s.dir}) has no validation sequences: not evaluated")
    flops = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    peak = device_peak_flops(device)
    tokens_per_step = t.global_batch * cfg.data.seq_len
    gas = t.global_batch // (t.micro_batch * info.world_size)
    result = TrainResult(step=0, tokens_seen=0, skipped_steps=0)
    run_id = uuid.uuid4().hex  # identifies this run's slot tables and exports; kept across resumes

    # ---- resume --------------------------------------------------------------------------
    if resume_from is not None:
        client, rank_state = checkpointer.load(resume_from, engine, values, cfg)
        result.step, result.tokens_seen = client["step"], client["tokens_seen"]
        run_id = client.get("run_id", run_id)
        result.skipped_steps = client.get("skipped_steps", 0)
        train_loader.load_state_dict(rank_state["data"])
        if stats is not None and "slots" in rank_state:
            stats.load_state_dict(rank_state["slots"])
        set_rng_state(rank_state["rng"])
        metrics.line(f"resumed from {resume_from} at step {result.step}")

    @record_function(regions.EVAL)
    def evaluate() -> dict:
        engine.eval()
        per_source = {}
        for source in validated:
            val_loader = build_loader(cfg, source.dir, "val", 0, 1, loop=True)
            batches = [batch for batch, _ in zip(val_loader, range(t.eval_batches))]
            per_source[source] = validation_loss(engine, batches, device)
        out = mixture_validation(per_source)
        if probes is not None:
            out.update(fact_recall(engine, probes, device))
        engine.train()
        return out

    def save_checkpoint() -> Path:
        rank_state = {"data": train_loader.state_dict(), "rng": rng_state()}
        if stats is not None:
            rank_state["slots"] = stats.state_dict()
        client = {"step": result.step, "tokens_seen": result.tokens_seen, "skipped_steps": result.skipped_steps,
                  "run_id": run_id}
        path = checkpointer.save(result.step, engine, values, client, rank_state, cfg, write_extra=save_slot_table)
        result.checkpoint = str(path)
        if stats is not None:
            result.slot_table = str(path / TABLE_FILENAME)
        return path

    def save_slot_table(folder: Path) -> None:
        if stats is None:
            return
        from pretrain.slots import model_config_hash, save_table

        reduced = stats.reduce(close_interval=False)
        if info.is_main:
            save_table(folder / TABLE_FILENAME, reduced, {
                "model_config_hash": model_config_hash(cfg.model),
                "tokenizer_hash": tokenizer.sha256,
                "run_id": run_id,
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
                with record_function(regions.FORWARD):
                    logits = engine(batch.tokens.to(device))
                    loss = language_model_loss(logits, batch.targets.to(device))
                with record_function(regions.BACKWARD):
                    engine.backward(loss)
                losses.append(loss.detach())
                if stats is not None:
                    stats.update(lookups.take(shared_table_stream), batch.doc_ids.to(device))
                if micro_step < gas - 1:
                    with record_function(regions.STEP):
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
            with record_function(regions.STEP):
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
                             world_size=info.world_size, device=device,
                             tokens_by_source=tokens_seen_per_source(train_loader))
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
                    result.requeued = requeue_job(stop=stop)  # last: a requeue cancels this job at once
                break
    finally:
        metrics.close()
    return result


def log_progress(metrics: MetricsLogger, cfg: RunConfig, result: TrainResult, multiplier: float, grad_norm,
                 value_grad_norm, tokens_per_s: float, step_time: float, flops: float, peak: float | None,
                 world_size: int, device: torch.device, tokens_by_source: dict | None = None) -> None:
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
    if tokens_by_source:
        scalars.update({f"data/tokens_seen/{name}": n for name, n in tokens_by_source.items()})
    metrics.scalars(scalars, result.step)
    metrics.line(
        f"step {result.step}/{cfg.train.max_steps} loss {scalars['train/loss']:.4f} "
        f"lr {scalars['train/lr_dense']:.2e} grad_norm {_fmt(scalars['train/grad_norm'])} "
        f"tok/s {tokens_per_s:,.0f} mfu {_fmt(utilisation, percent=True)}"
    )


def describe_data(cfg: RunConfig, sources: list, tokenizer) -> str:
    """One log line: the sources with their share, the tokenizer and the model's vocabulary."""
    total = sum(s.weight for s in sources)
    parts = [f"{s.name} ({s.dir}, {s.train_sequences} train sequences, weight {s.weight / total:.3f})"
             for s in sources]
    padding = cfg.model.vocab_size - tokenizer.vocab_size
    vocab = f"model.vocab_size {cfg.model.vocab_size}" + (f" ({padding} rows beyond the tokenizer)" if padding else "")
    return f"data: {'; '.join(parts)}; tokenizer {tokenizer.vocab_size} tokens, {vocab}, seq_len {cfg.data.seq_len}"


def mixture_validation(per_source: dict) -> dict:
    """val_loss/<source> for each source and their weighted mean as val_loss (one source: its own)."""
    from pretrain.evaluate import weighted_validation

    return weighted_validation({s.name: (s.weight, out) for s, out in per_source.items()})


def tokens_seen_per_source(loader) -> dict[str, int] | None:
    """Training tokens drawn from each source, summed over ranks (a collective); None for one source."""
    counts = getattr(loader, "tokens_per_source", None)
    if counts is None:
        return None
    counts = counts()
    if len(counts) < 2:
        return None
    values = torch.tensor(list(counts.values()), dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return {name: int(v) for name, v in zip(counts, values.tolist())}


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


def parse_args(argv=None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv=None, stop: StopSignal | None = None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config(config_path, overrides)
        result = train(cfg, stop)
    except (ConfigError, DataError, CheckpointError, SlurmEnvError) as err:
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
    code = main(stop=_STARTUP_STOP)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()
