"""Turning a checked config into the parts of a run, all checked before anything heavy: `build`
returns a `Trainer` (pretrain/trainer.py) holding them. In order: the data sources and tokenizer
(`build_data`), the run directory with the checkpoint to resume from or the export to start from
(`open_run_dir`; `NothingToTrain` where train.stop_after leaves nothing to do), the model with its
DeepSpeed engine and `Optimizers` (`build_model`), the loaders (`build_loader`), slot statistics,
metrics and evaluation; then the checkpoint's items are declared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import Checkpointer, CheckpointError, latest_checkpoint
from pretrain.config import ConfigError, RunConfig, check_runtime, save_config
from pretrain.data.errors import DataError
from pretrain.data.sources import resolve_eval_sources
from pretrain.dense_optimizer import build_dense_optimizer
from pretrain.distributed import DistInfo, rank0_text, rank0_value, refusal_shared
from pretrain.evaluate import Evaluator, load_seen_probes
from pretrain.init_from import InitSource, check_init_source, load_initial_weights
from pretrain.metrics import MetricsLogger, run_peak_flops
from pretrain.model import Transformer, flops_per_token, training_objective
from pretrain.model import names as model_names
from pretrain.optimizers import Optimizers
from pretrain.progress_log import describe_data
from pretrain.rng import RNGState, seed_everything
from pretrain.run_lock import RunDirLock
from pretrain.run_plan import describe_plan, training_plan
from pretrain.slots.table import TABLE_FILENAME
from pretrain.train_state import RankState, TrainState, new_run_id
from pretrain.trainer import Trainer, TrainResult
from pretrain.watchdog import HangWatchdog


class NothingToTrain(Exception):
    """train.stop_after is at or before the step of the checkpoint the run resumes from: the run
    stops before building the model, its `result` the checkpoint's."""

    def __init__(self, result: TrainResult):
        super().__init__(result.not_trained)
        self.result = result


LoaderFactory = Callable[..., Any]  # build_loader's signature: (cfg, dataset, split, rank, world_size, loop, rows=None)


def build(
    cfg: RunConfig, info: DistInfo, loaders: LoaderFactory, watchdog: HangWatchdog, lock: RunDirLock | None = None
) -> Trainer:
    """Everything a run needs, checked before anything heavy: data, run directory, model,
    optimizers, loaders, slot statistics, metrics, evaluation; the checkpoint items declared."""
    from pretrain.parallel.compile import compile_objective
    from pretrain.slots.checkpoint_item import SlotTableWriter

    check_runtime(cfg, world_size=info.world_size, device_type=info.device.type)
    sources, tokenizer = build_data(cfg, info)
    checkpointer, resume_from, init = open_run_dir(cfg, info, sources[0].dir, tokenizer.sha256, lock)
    model, engine, optimizers = build_model(cfg, info, checkpointer.needs_universal_load(resume_from), init)
    train_loader = loaders(cfg, sources, "train", info.rank, info.world_size, loop=True)
    stats = build_slot_statistics(cfg, info.device, len(sources))
    metrics = MetricsLogger(Path(cfg.train.run_dir) / "tensorboard", enabled=info.is_main)
    peak, unknown_peak = run_peak_flops(info.device, cfg.train.peak_flops)
    log_run_description(metrics, cfg, sources, tokenizer, unknown_peak, init, resume_from)
    state = TrainState(run_id=new_run_id())
    rank_items = {"data": train_loader, "rng": RNGState(info.rank, cfg.train.seed)}
    writers = []
    if stats is not None:
        rank_items["slots"] = stats
        writers.append(SlotTableWriter(stats, cfg.model, tokenizer.sha256, state, info.is_main))
    checkpointer.track(engine, optimizers.values, state, RankState(rank_items, optional=("slots",)), writers)
    lookups = None
    if stats is not None:
        from pretrain.model.lookups import LookupRecorder

        lookups = LookupRecorder(model.memory_layers())
    evaluator = Evaluator(
        cfg,
        sources,
        load_seen_probes(cfg, sources, tokenizer, metrics),
        loaders,
        info.device,
        resolve_eval_sources(cfg.data, sources),
        info.rank,
        info.world_size,
    )
    if cfg.train.eval_every > 0:
        metrics.line(evaluator.scope_line())
    return Trainer(
        cfg=cfg,
        info=info,
        engine=engine,
        optimizers=optimizers,
        train_loader=train_loader,
        stats=stats,
        lookups=lookups,
        shared_table_stream=len(model_names.slot_stream_names(cfg.model.memory)) > len(model.memory_layers()),
        checkpointer=checkpointer,
        resume_from=resume_from,
        metrics=metrics,
        evaluator=evaluator,
        state=state,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len)["total"],
        peak_flops=peak,
        watchdog=watchdog,
        objective=compile_objective(training_objective) if cfg.train.compile else training_objective,
    )


def log_run_description(
    metrics: MetricsLogger,
    cfg: RunConfig,
    sources: list,
    tokenizer,
    unknown_peak: str | None,
    init: InitSource | None,
    resume_from: Path | None,
) -> None:
    """The training log's opening lines: the data, the training plan, a device whose peak FLOP/s
    is unknown (no MFU), and where the weights start (train.init_from, unless resuming)."""
    metrics.line(describe_data(cfg, sources, tokenizer))
    own_data = bool(cfg.data.dir or cfg.data.sources)
    for line in describe_plan(training_plan(cfg, sources), note_repeats=own_data):
        metrics.line(line)
    if unknown_peak:
        metrics.line(unknown_peak)
    if init is not None:
        metrics.line(init.describe())
    elif cfg.train.init_from:
        metrics.line(f"train.init_from is not read: the run resumes from its checkpoint {resume_from.name}")


def build_data(cfg: RunConfig, info: DistInfo) -> tuple[list, Any]:
    """The checked data sources and the tokenizer, which must fit model.vocab_size. Each check reads
    this rank's view of the files; a refusal on any rank is raised on every rank, naming it."""
    from pretrain.data import Tokenizer
    from pretrain.data.checks import check_trainable, describe_shard_problems, shard_problems

    sources = prepare_dataset(cfg, info)
    with refusal_shared(ConfigError, DataError):
        check_trainable(sources)
        # a shard gone, cut short or replaced since the preparation was met only when the loader reached
        # it, maybe hours in; checked once per node (data.dir may be a node-local copy)
        problems = shard_problems(sources) if info.local_rank == 0 else []
        if problems and cfg.data.on_corrupt == "skip":
            print(f"warning: {describe_shard_problems(problems)}", flush=True)
        elif problems:
            raise DataError(describe_shard_problems(problems))
        resolve_eval_sources(cfg.data, sources)  # held-out corpora fit the data actually trained on
        dataset_dir = sources[0].dir
        tokenizer = Tokenizer(dataset_dir / "tokenizer.model")
        if tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"the tokenizer in {dataset_dir} has {tokenizer.vocab_size} tokens but model.vocab_size="
                f"{cfg.model.vocab_size}: raise model.vocab_size to at least {tokenizer.vocab_size}"
            )
    return sources, tokenizer


def prepare_dataset(cfg: RunConfig, info: DistInfo) -> list:
    """The run's data sources: `data.sources` / `data.dir` (checked), or the embedded corpus, built
    once by rank 0, as a mixture of one. A refusal on any rank is raised on every rank."""
    from pretrain.data import prepare_embedded_dataset
    from pretrain.data.shards import read_manifest
    from pretrain.data.sources import Source, resolve_sources

    with refusal_shared(ConfigError, DataError):  # each rank reads the folders (node-local copies may differ)
        sources = resolve_sources(cfg.data, cfg.data.seq_len)
    if sources:
        return sources
    with refusal_shared(ConfigError, DataError):  # the others wait here for rank 0's build
        if info.is_main:
            path = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=True)
    with refusal_shared(ConfigError, DataError):
        if not info.is_main:  # finds rank 0's cached build
            path = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
        manifest = read_manifest(path)
    return [Source("embedded", path, 1.0, manifest)]


def open_run_dir(
    cfg: RunConfig, info: DistInfo, dataset_dir: Path, tokenizer_sha256: str, lock: RunDirLock | None = None
) -> tuple[Checkpointer, Path | None, InitSource | None]:
    """The run's checkpointer, the checkpoint to resume from, else the export to start from
    (train.init_from), all checked before anything is written or built: a damaged checkpoint
    or a mismatched export is refused, naming the file; then saves the config. NothingToTrain
    (nothing written) where train.stop_after is at or before the checkpoint's step."""
    run_dir = Path(cfg.train.run_dir)
    if lock is not None and rank0_value(int(run_dir.is_dir())):
        lock.acquire()  # first: a job training this directory now would prune what is checked below
    checkpointer = Checkpointer(run_dir, info.rank, cfg.train.keep_checkpoints, info.world_size)
    with refusal_shared(CheckpointError):
        found = latest_checkpoint(checkpointer.root)
    # rank 0's answer: one rank's stale view of a network filesystem must not make the ranks part ways
    named = rank0_text(str(found) if found is not None else "")
    resume_from = Path(named) if named else None
    init = None
    if resume_from is not None:
        saved = checkpointer.verify(resume_from, cfg, dataset_dir)
        check_stop_after(cfg, saved, resume_from)
    elif cfg.train.init_from:
        with refusal_shared(ConfigError):  # each rank reads the export
            init = check_init_source(cfg, tokenizer_sha256, dataset_dir)
    if lock is not None and not lock.held:  # a new directory: before the first write into it
        lock.acquire()
    with refusal_shared(ConfigError):
        if info.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                save_config(cfg, run_dir / "config.yaml")
            except OSError as err:
                raise ConfigError(f"train.run_dir={run_dir} cannot be written ({err}): give a writable folder") from err
    return checkpointer, resume_from, init


def check_stop_after(cfg: RunConfig, saved, resume_from: Path) -> None:
    """NothingToTrain where train.stop_after (set) is at or before the step of the checkpoint the
    run resumes from (`saved`, as `Checkpointer.verify` read it): the loop, which stops when the
    step equals it, would otherwise train on to train.max_steps."""
    stop_after, t = cfg.train.stop_after, cfg.train
    if not stop_after or stop_after > saved.step:
        return
    table = resume_from / TABLE_FILENAME
    raise NothingToTrain(
        TrainResult(
            step=saved.step,
            tokens_seen=saved.tokens_seen,
            skipped_steps=saved.skipped_steps,
            checkpoint=str(resume_from),
            slot_table=str(table) if table.is_file() else None,
            not_trained=(
                f"train.stop_after={stop_after} is not after step {saved.step} of the checkpoint {resume_from} "
                f"this run resumes from: nothing trained, nothing written. To go on, set train.stop_after above "
                f"{saved.step} (or 0 to run to train.max_steps={t.max_steps})"
            ),
        )
    )


VALUE_SEED_STRIDE = 1_000_003  # above any table count: no two (train.seed, table) pairs share a seed


def build_model(
    cfg: RunConfig, info: DistInfo, load_universal: bool = False, init: InitSource | None = None
) -> tuple[Transformer, Any, Optimizers]:
    """The model, its DeepSpeed engine and the optimizers of its dense part and value shards.

    Built on the meta device so that no rank ever holds the full value pool
    (`build_sharded_model`), with train.seed on every rank."""
    import deepspeed

    from pretrain.parallel import init_memory_groups
    from pretrain.parallel.activation_checkpointing import apply_activation_checkpointing
    from pretrain.parallel.compile import apply_compile
    from pretrain.parallel.memory_parallel import build_sharded_model

    t = cfg.train
    groups = init_memory_groups(cfg.model.memory.parallel_size)
    # value table i draws from its own generator, seeded train.seed * VALUE_SEED_STRIDE + i:
    # another train.seed gives other values (as it gives other dense weights), seed 0 gives i
    model, values = build_sharded_model(
        cfg.model,
        groups,
        cfg.optim,
        kernel=cfg.model.memory.kernel,
        device=info.device,
        seed=t.seed,
        value_seed=t.seed * VALUE_SEED_STRIDE,
        reseed=seed_everything,
    )
    if init is not None:
        load_initial_weights(model, values.tables, init)
    if t.compile:
        apply_compile(model)
    apply_activation_checkpointing(model, t.activation_checkpointing, t.activation_checkpointing_layers)
    dense_optimizer = build_dense_optimizer(model, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=dense_optimizer, config=deepspeed_config(cfg, info.world_size, load_universal)
    )
    return model, engine, Optimizers(engine, dense_optimizer, values, cfg.optim)


def deepspeed_config(cfg: RunConfig, world_size: int, load_universal: bool = False) -> dict:
    """`load_universal`: the resumed checkpoint's dense state comes re-partitioned for another
    world size (pretrain.resharding)."""
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
        "checkpoint": {"load_universal": load_universal},
    }


def build_loader(cfg: RunConfig, dataset, split: str, rank: int, world_size: int, loop: bool, rows: int | None = None):
    """Train: a `MixtureLoader` over the sources (a list); otherwise a `ShardLoader` of one
    dataset dir's `split` (validation, or a held-out corpus's training split), of its first `rows`
    rows when given (this rank's part of them)."""
    from pretrain.data import ShardLoader
    from pretrain.data.mixture import MixtureLoader

    if split == "train" and isinstance(dataset, list):
        return MixtureLoader(
            dataset,
            batch_size=cfg.train.micro_batch,
            rank=rank,
            world_size=world_size,
            num_workers=cfg.data.num_workers,
            seed=cfg.train.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            on_corrupt=cfg.data.on_corrupt,
            seq_len=cfg.data.seq_len,
        )
    return ShardLoader(
        dataset,
        split=split,
        batch_size=cfg.train.micro_batch,
        seq_len=cfg.data.seq_len,
        rank=rank,
        world_size=world_size,
        num_workers=0,
        seed=cfg.train.seed,
        shuffle_buffer=0,
        on_corrupt=cfg.data.on_corrupt,
        loop=loop,
        rows=rows,
    )


def build_slot_statistics(cfg: RunConfig, device: torch.device, num_sources: int = 1):
    if not (cfg.slots.enabled and cfg.model.memory.enabled):
        return None
    from pretrain.slots import SlotStatistics

    return SlotStatistics(
        num_slots=cfg.model.memory.num_slots,
        layer_names=model_names.slot_stream_names(cfg.model.memory),
        granularity=cfg.slots.granularity,
        device=device,
        sample_batches=cfg.slots.sample_batches,
        seed=cfg.train.seed,
        streams=num_sources * max(1, cfg.data.num_workers),  # one per (source, worker): Batch.streams
    )
