"""The training loop: `python -m pretrain.train --config configs/tiny.yaml key=value ...`.

`train` = the process group and the hang watchdog (pretrain/watchdog.py, told of every
step and periodic action) -> `build` (data, run directory, model + DeepSpeed engine + `Optimizers`, loaders,
slot counters, metrics, evaluation; the checkpoint's items declared) -> `Trainer.resume` ->
`Trainer.fit`, the loop: `train_step` (micro-batches: forward, backward, count slot
accesses; then clip and one `Optimizers.step`, skipped on a non-finite loss, and the step's
slot accesses with it), `count` (the `TrainState`), the periodic work each due by its own
`Every` cadence (log, slot statistics, evaluate, checkpoint), and the stop check. No callback
framework. The log's lines are pretrain/progress_log.py's; the evaluation, pretrain/evaluate.py's.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.slurm import SlurmEnvError, StopSignal  # the standard library only

# `python -m pretrain.train` (the sbatch templates): the stop handler is installed before the
# heavy imports below (seconds), so a USR1/SIGTERM during start-up is recorded, not fatal;
# train() takes it over.
_STARTUP_STOP = StopSignal() if __name__ == "__main__" else None

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import record_function  # noqa: E402

from kernels.build_locks import clear_stale_build_locks  # noqa: E402
from pretrain import profiler_regions as regions  # noqa: E402
from pretrain.cadence import Every  # noqa: E402
from pretrain.checkpoint import Checkpointer, CheckpointError, latest_checkpoint  # noqa: E402
from pretrain.config import ConfigError, RunConfig, check_runtime, load_config, save_config, validate  # noqa: E402
from pretrain.data.errors import DataError  # noqa: E402
from pretrain.data.loader import IGNORE_INDEX, LOADER_FAILURES, loader_failure  # noqa: E402
from pretrain.data.sources import resolve_eval_sources  # noqa: E402
from pretrain.dense_optimizer import build_dense_optimizer  # noqa: E402
from pretrain.distributed import (  # noqa: E402
    DistInfo,
    RendezvousTimeout,
    gather_floats,
    global_sum,
    init_distributed,
    launched_world_size,
    rank0_text,
    rank0_value,
    refusal_shared,
    share_refusal,
)
from pretrain.evaluate import EvaluationStopped, Evaluator, load_seen_probes  # noqa: E402
from pretrain.init_from import InitSource, check_init_source, load_initial_weights  # noqa: E402
from pretrain.lr_schedule import lr_multiplier  # noqa: E402
from pretrain.metrics import MetricsLogger, run_peak_flops  # noqa: E402
from pretrain.model import Objective, Transformer, flops_per_token, training_objective  # noqa: E402
from pretrain.model import names as model_names  # noqa: E402
from pretrain.optimizers import GradNorms, Optimizers  # noqa: E402
from pretrain.out_of_memory import OutOfMemory, explain_out_of_memory  # noqa: E402
from pretrain.peak_memory import IntervalPeak  # noqa: E402
from pretrain.progress_log import describe_data, log_progress, log_slot_statistics, tokens_seen_per_source  # noqa: E402
from pretrain.rng import RNGState, seed_everything  # noqa: E402
from pretrain.run_lock import RunDirLock  # noqa: E402
from pretrain.run_plan import describe_plan, training_plan  # noqa: E402
from pretrain.slots.table import TABLE_FILENAME  # noqa: E402
from pretrain.train_state import RankState, TrainState, new_run_id  # noqa: E402
from pretrain.watchdog import HangWatchdog  # noqa: E402


class TrainingDiverged(RuntimeError):
    """A non-finite loss under nan_policy=stop (or too many skipped steps); a checkpoint was saved."""


@dataclass
class TrainResult:
    """What `train` returns: where the run ended and this run's record (the loop's own state
    is the `TrainState`)."""

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
    peak_memory_bytes: int | None = None  # this run's peak (CUDA max allocated, or peak RSS); None: not trained
    not_trained: str | None = None  # why the run stopped before training (train.stop_after already reached)


class NothingToTrain(Exception):
    """train.stop_after is at or before the step of the checkpoint the run resumes from: the run
    stops before building the model, its `result` the checkpoint's."""

    def __init__(self, result: TrainResult):
        super().__init__(result.not_trained)
        self.result = result


def global_step_loss(loss: torch.Tensor, z: torch.Tensor | None = None) -> tuple[float, bool, float | None]:
    """The step's loss summed over ranks, whether every rank's loss was finite, and the sum of
    the z-loss term `z` over ranks (None without one). Each rank passes its share: its
    micro-batches' means weighted by their scored targets over the step's (all ranks') total,
    so the sum is the mean over every scored target of the step.

    One small all-reduce read on the host (the stop check and the Triton bag's index range
    check synchronise too).
    """
    values = torch.stack([loss.float(), (~torch.isfinite(loss)).float(), z.float() if z is not None else loss * 0])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    value, nonfinite, z_sum = values.tolist()
    return value, nonfinite == 0, z_sum if z is not None else None


def rank_share(means: tuple, scored: list[int], total: int, device: torch.device) -> torch.Tensor:
    """This rank's share of a step's mean over its `total` scored targets (all ranks): its
    micro-batches' `means`, each weighted by its `scored` targets / `total`. A micro-batch without
    a scored target (its mean NaN) adds nothing; a step without any gives NaN (skipped)."""
    share = torch.zeros((), device=device)
    for mean, n in zip(means, scored):
        if n:
            share = share + mean.float() * (n / total)
    return share if total else torch.full((), float("nan"), device=device)


LoaderFactory = Callable[..., Any]  # build_loader's signature: (cfg, dataset, split, rank, world_size, loop, rows=None)


def train(
    cfg: RunConfig,
    stop: StopSignal | None = None,
    loaders: LoaderFactory | None = None,
    save_checkpoints: bool = True,
) -> TrainResult:
    """Run (or resume) the training described by `cfg`; every rank calls it. `stop`: a handler
    installed earlier (it keeps any signal already received; the caller closes it), else one is
    installed now and closed on return.
    `loaders`: builds the data loaders (default `build_loader`; tests pass their own).
    `save_checkpoints=False` (benchmark and profile runs, nothing to resume): no checkpoint is
    written, also not at the last step, where a 373M memory model's would be ~18 GB."""
    # Installed first: a preemption signal during start-up must not kill the task, and
    # data-loader workers started later inherit the handler. A caller's `stop` stays installed
    # (the CLI's until the process exits: a signal during the teardown after the loop would
    # otherwise meet the default action, which kills the task and fails a finished job).
    own_stop = stop is None
    stop = stop if stop is not None else StopSignal()
    lock = None  # of the run directory: rank 0 takes it before its first write there (pretrain/run_lock.py)
    try:
        clear_stale_build_locks()  # a killed op build would hang the start below, silently
        info = init_distributed(process_group_timeout(validate(cfg).train), cfg.train.rendezvous_timeout_s)
        memory = IntervalPeak(info.device)
        memory.reset("this run started")
        lock = RunDirLock(cfg.train.run_dir, info.is_main)
        with hang_watchdog(cfg, info) as watchdog, explain_out_of_memory(cfg, info, watchdog, memory):
            try:
                trainer = build(cfg, info, loaders or build_loader, watchdog, lock)
            except NothingToTrain as done:
                if info.is_main:
                    print(done.result.not_trained, flush=True)
                return done.result
            trainer.save_checkpoints, trainer.memory = save_checkpoints, memory
            try:
                trainer.resume()
                return trainer.fit(stop)
            finally:
                trainer.metrics.close()
    finally:
        if lock is not None:
            lock.release()
        if own_stop:
            stop.close()


def leave_dead_workers_to_the_loader() -> None:
    """torch's DataLoader installs, once per process, a SIGCHLD handler that raises a dead worker's
    error wherever the main thread is, inside a collective too, where that rank alone left the
    others waiting for it (measured: raised from the slot statistics' all-reduce). Marked as
    installed, it is not: the loader finds the dead worker itself, within 5 s, in the wait for the
    next batch, where `Trainer.step_batches` tells every rank."""
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True


def process_group_timeout(t) -> float:
    """Seconds a collective may wait: longer than any allowance of the hang watchdog, so that a
    hang is reported by the watchdog (with stacks) and not by a collective's timeout error, and
    than a universal-checkpoint conversion the other ranks wait for at start-up."""
    return max(600.0, t.startup_timeout_s, t.hang_timeout_s) + 120.0


def hang_watchdog(cfg: RunConfig, info: DistInfo) -> HangWatchdog:
    """This rank's hang watchdog (pretrain/watchdog.py), its reports named by rank 0's start time."""
    t = cfg.train
    started = rank0_value(int(time.time())) if t.hang_timeout_s > 0 else int(time.time())
    return HangWatchdog(
        t.run_dir,
        attempt=time.strftime("%Y%m%d-%H%M%S", time.localtime(started)),
        rank=info.rank,
        world_size=info.world_size,
        timeout=t.hang_timeout_s,
        startup_timeout=t.startup_timeout_s,
        requeue=t.requeue_on_hang,
    )


@dataclass
class StepOutput:
    """What one optimizer step reports: the loss (its mean over the step's scored targets, all
    ranks), whether the update was applied (else it was skipped: a non-finite loss or gradient
    norm), the gradient norms, the schedule's multiplier, its start and duration."""

    loss: float
    applied: bool
    norms: GradNorms
    multiplier: float  # of the learning-rate schedule
    start: float
    seconds: float
    z_loss: float | None = None  # the log(Z)^2 term (the same mean), when optim.z_loss > 0


@dataclass
class Trainer:
    """What `build` made for one run, and the run's progress (`state`, saved with checkpoints)."""

    cfg: RunConfig
    info: DistInfo
    engine: Any  # the DeepSpeed engine around the model's dense part
    optimizers: Optimizers
    train_loader: Any
    stats: Any  # SlotStatistics, or None when slot statistics are off
    lookups: Any  # LookupRecorder handing each micro-batch's slot indices to `stats`
    shared_table_stream: bool
    checkpointer: Checkpointer
    resume_from: Path | None
    metrics: MetricsLogger
    evaluator: Evaluator
    state: TrainState
    flops_per_token: float  # of forward + backward, for the MFU
    peak_flops: float | None  # one device's peak FLOP/s (train.peak_flops or the GPU's); None: no MFU
    watchdog: HangWatchdog  # told of every step, evaluation and checkpoint
    objective: Callable[..., Objective] = training_objective  # compiled under train.compile
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_by_signal: bool = False
    requeued: bool = False
    save_checkpoints: bool = True  # False: save_checkpoint does nothing (train(save_checkpoints=...))
    memory: IntervalPeak | None = None  # the peak memory per log interval and of the run (train() passes its own)
    stop: Any = None  # fit's StopSignal: the evaluation asks it between batches, the loop after each step

    def __post_init__(self):
        if self.memory is None:
            self.memory = IntervalPeak(self.info.device)
        t = self.cfg.train
        self.micro_batches = t.global_batch // (t.micro_batch * self.info.world_size)
        self.tokens_per_step = t.global_batch * self.cfg.data.seq_len
        self.periodic = [(Every(t.log_every, t.max_steps), self.log)]  # in this order after each step
        if self.stats is not None:
            self.periodic.append((Every(self.cfg.slots.log_every, t.max_steps), self.log_slots))
        self.periodic += [
            (Every(t.eval_every, t.max_steps), self.evaluate),
            (Every(t.checkpoint_every, t.max_steps), self.save_checkpoint),
        ]
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        self.interval_data_wait = 0.0  # seconds this rank waited for batches since the last log
        self.interval_paused = 0.0  # seconds in evaluation, checkpoints, slot logs since the last log
        self.last_step: StepOutput | None = None
        self.interval_losses: list[float] = []  # of the steps applied since the last log (train/loss_mean)
        self.first_step_time: float | None = None  # seconds; this run's first step is off the throughput clock

    # ---- the loop ------------------------------------------------------------------------
    def fit(self, stop) -> TrainResult:
        self.stop = stop
        leave_dead_workers_to_the_loader()
        batches = iter(self.train_loader)
        self.memory.reset(f"training began at step {self.state.step}")  # the run's peak keeps start-up's
        self.interval_start = time.perf_counter()  # after building and resuming
        while self.state.step < self.cfg.train.max_steps:
            self.last_step = self.train_step(batches)
            self.count(self.last_step)  # a non-finite loss: skipped, or TrainingDiverged
            if self.first_step_time is None:
                self.leave_out_first_step()
            self.watchdog.progress(f"step {self.state.step}")
            self.run_periodic()
            if self.stop_requested():
                break
        return self.result()

    def train_step(self, batches) -> StepOutput:
        """One optimizer step over the step's micro-batches; the update is skipped if any
        rank's loss is not finite."""
        start = time.perf_counter()
        multiplier = lr_multiplier(self.state.step, self.cfg.optim, self.cfg.train.max_steps)
        step_batches, unreadable = self.step_batches(batches)
        if self.stats is not None:
            self.stats.begin_step()
        # Each micro-batch's objective is a mean over its scored targets (padding is not scored);
        # DeepSpeed divides each by the micro-batches and averages over ranks. Weighting the i-th by
        # n_i x micro-batches x world / N (N: the step's scored targets over all ranks) makes the
        # accumulated gradient, and the logged loss, those of the mean over all N targets.
        scored = [int((batch.targets != IGNORE_INDEX).sum()) for batch in step_batches]
        # a rank whose data failed adds a large negative count: every rank learns of it in the
        # all-reduce the step makes anyway, and all raise its DataError (it alone used to)
        total = global_sum(sum(scored) if unreadable is None else -(2**62))
        if total < 0:
            share_refusal(unreadable, (DataError,))
        scale = self.micro_batches * self.info.world_size
        losses, z_terms = zip(
            *(
                self.forward_backward(
                    batch, last_micro_batch=i == self.micro_batches - 1, scale=n * scale / total if total else 0.0
                )
                for i, (batch, n) in enumerate(zip(step_batches, scored))
            )
        )
        loss = rank_share(losses, scored, total, self.info.device)
        z = rank_share(z_terms, scored, total, self.info.device) if self.cfg.optim.z_loss else None
        loss, finite, z_mean = global_step_loss(loss.float(), z)
        norms = self.optimizers.clip()
        with record_function(regions.STEP):
            applied = self.optimizers.step(multiplier, skip=not (finite and norms.finite()))
        if self.stats is not None and not applied:
            self.stats.discard_step()  # the update is skipped: so are the step's slot accesses
        return StepOutput(loss, applied, norms, multiplier, start, time.perf_counter() - start, z_mean)

    def leave_out_first_step(self) -> None:
        """This run's first step compiles, initialises lazily (DeepSpeed, the kernels) and starts the
        loader's workers: its time is logged on its own (perf/first_step_time_s) and the throughput
        clock (tokens/s, MFU, the data-wait share) starts after it."""
        now = time.perf_counter()
        self.first_step_time = now - self.interval_start
        self.metrics.scalars({"perf/first_step_time_s": self.first_step_time}, self.state.step)
        self.metrics.line(
            f"step {self.state.step}: this run's first step took {self.first_step_time:.2f} s (compilation, "
            "start-up), left out of tokens/s, MFU and the data-wait share"
        )
        self.interval_start, self.interval_steps, self.interval_data_wait = now, 0, 0.0

    def run_periodic(self) -> None:
        """The log, slot statistics, evaluation and checkpoint due after this step. Their time is
        kept off the throughput clock: tokens/s, MFU and the data-wait share are of training."""
        for every, action in self.periodic:
            if every.due(self.state.step):
                started = time.perf_counter()
                action()
                if action != self.log:  # the log restarts the interval itself
                    self.interval_paused += time.perf_counter() - started
                self.watchdog.progress(f"{action.__name__} at step {self.state.step}")

    def step_batches(self, batches) -> tuple[list, DataError | None]:
        """The step's micro-batches, or none and the DataError this rank's loader raised (a shard
        that turned out corrupt, under data.on_corrupt=error): `train_step` tells every rank. So is
        a loader that failed otherwise: a worker killed (the kernel's OOM killer), a shard its node
        cannot read (a stale network-filesystem handle); raised on this rank alone, the others
        waited for it in the step's all-reduce until the hang watchdog fired."""
        try:
            return [self.next_batch(batches) for _ in range(self.micro_batches)], None
        except DataError as err:
            return [], err
        except LOADER_FAILURES as err:
            return [], loader_failure(err, f"the training data loader failed at step {self.state.step + 1}")

    def next_batch(self, batches):
        """The next micro-batch; the time spent waiting for it is counted (perf/data_wait_fraction)."""
        start = time.perf_counter()
        batch = next(batches)
        self.interval_data_wait += time.perf_counter() - start
        return batch

    def forward_backward(
        self, batch, last_micro_batch: bool, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Forward and backward of one micro-batch: its cross-entropy and z-loss term (None when
        optim.z_loss is 0), means over its scored targets, detached; the gradient is of `scale` x
        (CE + optim.z_loss x the z term). `scale` 0 (no scored target, where the means are NaN):
        a zero gradient, through the same backward (its collectives included)."""
        with record_function(regions.FORWARD):
            doc_ids = batch.doc_ids if self.cfg.data.document_masking else None
            logits = self.engine(batch.tokens.to(self.info.device), doc_ids=doc_ids)
            loss, z, objective = self.objective(logits, batch.targets.to(self.info.device), self.cfg.optim.z_loss)
            objective = objective * scale if scale else logits.float().sum() * 0.0
        self.optimizers.backward(objective, last_micro_batch)
        if self.stats is not None:
            self.stats.update(
                self.lookups.take(self.shared_table_stream),
                batch.doc_ids.to(self.info.device),
                streams=getattr(batch, "streams", None),
            )
        return loss.detach(), z.detach() if z is not None else None

    def count(self, out: StepOutput) -> None:
        """Advance the train state by the step; a skipped step is logged (its tokens are drawn from
        the data but not trained on: tokens_seen leaves them out, as the slot table does), and past
        the policy's limit a checkpoint is saved and TrainingDiverged raised."""
        t, state = self.cfg.train, self.state
        self.step_times.append(out.seconds)
        state.step += 1
        if self.stats is not None:
            self.stats.end_step(state.step)  # steps completed, as in checkpoint tags
        self.interval_steps += 1
        if out.applied:
            state.tokens_seen += self.tokens_per_step
            self.losses.append(out.loss)
            self.interval_losses.append(out.loss)
            return
        state.skipped_steps += 1
        reason = "non-finite loss" if not math.isfinite(out.loss) else "non-finite gradients"
        dense = self.optimizers.dense_grad_norm(out.norms)
        self.metrics.line(
            f"step {state.step}: {reason} (loss {out.loss}, gradient norm dense {dense}, values "
            f"{float(out.norms.values)}); update skipped ({state.skipped_steps} so far)"
        )
        self.metrics.scalars({"train/skipped_steps": state.skipped_steps}, state.step)
        if t.nan_policy == "stop" or state.skipped_steps > t.max_skipped_steps:
            self.save_checkpoint()
            raise TrainingDiverged(
                f"{reason} at step {state.step} (train.nan_policy={t.nan_policy}, "
                f"{state.skipped_steps} skipped); checkpoint saved in {self.checkpoint}"
            )

    # ---- periodic work ---------------------------------------------------------------------
    def log(self) -> None:
        out, now = self.last_step, time.perf_counter()
        elapsed = max(now - self.interval_start - self.interval_paused, 1e-9)  # training time only
        # none after an interval of the first step alone (left out; the same on every rank)
        tokens_per_s = self.interval_steps * self.tokens_per_step / elapsed if self.interval_steps else None
        data_wait = gather_floats(self.interval_data_wait / elapsed) if self.interval_steps else None  # a collective
        log_progress(
            self.metrics,
            self.cfg,
            self.state,
            out.loss if out.applied else None,  # a skipped step has no loss to show (logged as skipped)
            math.fsum(self.interval_losses) / len(self.interval_losses) if self.interval_losses else None,
            self.optimizers.lrs(out.multiplier),
            self.optimizers.dense_grad_norm(out.norms),
            out.norms.values if self.optimizers.has_values else None,  # a dense model has no value tables
            tokens_per_s=tokens_per_s,
            step_time=now - out.start,
            flops_per_token=self.flops_per_token,
            peak_flops=self.peak_flops,
            world_size=self.info.world_size,
            memory_bytes=self.memory.read(),
            tokens_by_source=tokens_seen_per_source(self.train_loader),
            data_wait=data_wait,
            z_loss=out.z_loss,
        )
        self.memory.reset(f"the log at step {self.state.step}")
        self.interval_losses = []
        self.interval_start, self.interval_steps = time.perf_counter(), 0
        self.interval_data_wait = self.interval_paused = 0.0

    def log_final_state(self) -> None:
        """At a stop before train.max_steps: the training log of this step where its cadence did
        not just write it. Otherwise the steps since the last log would never be logged: the resumed
        run's TensorBoard continues after this step. The slot statistics are not logged here: their
        open interval is saved with the checkpoint and logged whole by the resumed run, so a stopped
        and resumed run's slot table (its coverage history included) equals an uninterrupted run's."""
        for every, action in self.periodic:
            if action == self.log and not every.due(self.state.step):
                action()

    def log_slots(self) -> None:
        log_slot_statistics(self.stats, self.metrics, self.state.step)

    def evaluate(self) -> None:
        """The evaluation; a stop signal ends it at the next batch (the ranks agree on it there),
        and the stop check after `run_periodic` checkpoints."""
        try:
            self.last_eval = self.evaluator(self.engine, self.stop.should_stop if self.stop is not None else None)
        except EvaluationStopped as stopped:
            self.last_eval = {}
            self.metrics.line(
                f"evaluation at step {self.state.step} ended by a stop signal during its {stopped}: "
                "its partial result is not logged; the checkpoint follows"
            )
            return
        self.metrics.scalars({f"eval/{k}": v for k, v in self.last_eval.items()}, self.state.step)
        self.metrics.line("eval " + " ".join(f"{k} {v:.4f}" for k, v in self.last_eval.items()))

    def save_checkpoint(self) -> None:
        if self.save_checkpoints:
            self.checkpoint = self.checkpointer.save(self.state.step, self.cfg)

    def stop_requested(self) -> bool:
        """A stop signal or train.stop_after: checkpoint (unless this step's is saved), then
        requeue on a preemption signal. True when the loop should end."""
        stop = self.stop
        signalled = stop.should_stop()
        step, t = self.state.step, self.cfg.train
        if signalled and (step >= t.max_steps or step == t.stop_after):
            # The run stops here anyway (finished: its last checkpoint written by run_periodic): a
            # requeued job would wait for all its nodes again, then train nothing and end.
            self.metrics.line(
                f"stop signal at step {step}, the run's last: the run is finished, not requeued"
                if step >= t.max_steps
                else f"stop signal at step {step}, where train.stop_after stops the run: not requeued"
            )
            signalled = False
        if not (signalled or step == t.stop_after):
            return False
        self.log_final_state()
        if self.checkpointer.saved_step != step:
            self.save_checkpoint()
        self.metrics.line(
            f"stopping at step {step} ({'signal' if signalled else 'train.stop_after'}); checkpoint {self.checkpoint}"
        )
        self.stopped_by_signal = signalled
        if signalled and stop.requeue:  # USR1 (preemption); SIGTERM means cancel
            from pretrain.slurm import requeue_job

            self.requeued = requeue_job(stop=stop)  # last: a requeue cancels this job at once
        return True

    def resume(self) -> None:
        """Restore every checkpointed item from the run directory's latest checkpoint, if any."""
        for unfinished in self.checkpointer.unfinished():
            self.metrics.line(
                f"ignored the unfinished checkpoint {unfinished} (a run stopped while writing it); "
                f"resuming from {self.resume_from.name if self.resume_from else 'the start'}, it is removed at the next save"
            )
        if self.resume_from is not None:
            resharded = self.checkpointer.load(self.resume_from)
            self.metrics.resumed_at(self.state.step)
            self.metrics.line(f"resumed from {self.resume_from} at step {self.state.step}")
            if self.save_checkpoints:  # the state's checkpoint until a step saves another (none: finished)
                self.checkpoint = self.resume_from
            for note in (resharded, self.checkpointer.schedule_change, self.checkpointer.mixture_change):
                if note:
                    self.metrics.line(note)
            if self.stats is not None and self.state.step and not (self.stats.step or self.stats.history["step"]):
                self.stats.start_at(self.state.step)  # the checkpoint holds no slot statistics
                self.metrics.line(
                    f"the checkpoint holds no slot statistics (slots.enabled was false): slot counting starts "
                    f"after step {self.state.step}, and the slot table counts the steps after it (first_step)"
                )

    def result(self) -> TrainResult:
        s = self.state
        return TrainResult(
            step=s.step,
            tokens_seen=s.tokens_seen,
            skipped_steps=s.skipped_steps,
            losses=self.losses,
            step_times=self.step_times,
            first_loss=self.losses[0] if self.losses else None,
            eval=self.last_eval,
            checkpoint=str(self.checkpoint) if self.checkpoint is not None else None,
            slot_table=str(self.checkpoint / TABLE_FILENAME) if self.checkpoint and self.stats is not None else None,
            stopped_by_signal=self.stopped_by_signal,
            requeued=self.requeued,
            peak_memory_bytes=max(self.memory.read(), self.memory.run_peak),  # with the last interval's
        )


# ---- build ------------------------------------------------------------------------------------
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
    metrics.line(describe_data(cfg, sources, tokenizer))
    own_data = bool(cfg.data.dir or cfg.data.sources)
    for line in describe_plan(training_plan(cfg, sources), note_repeats=own_data):
        metrics.line(line)
    peak, unknown_peak = run_peak_flops(info.device, cfg.train.peak_flops)
    if unknown_peak:
        metrics.line(unknown_peak)
    if init is not None:
        metrics.line(init.describe())
    elif cfg.train.init_from:
        metrics.line(f"train.init_from is not read: the run resumes from its checkpoint {resume_from.name}")
    state = TrainState(run_id=new_run_id())
    rank_items = {"data": train_loader, "rng": RNGState(info.rank, cfg.train.seed)}
    writers = []
    if stats is not None:
        rank_items["slots"] = stats
        writers.append(SlotTableWriter(stats, cfg.model, tokenizer.sha256, state, info.is_main))
    checkpointer.track(engine, optimizers.values, state, RankState(rank_items, optional=("slots",)), writers)
    lookups = None
    if cfg.slots.enabled:
        from pretrain.model.lookups import LookupRecorder

        lookups = LookupRecorder(model.memory_layers())
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
        evaluator=Evaluator(
            cfg,
            sources,
            load_seen_probes(cfg, sources, tokenizer, metrics),
            loaders,
            info.device,
            resolve_eval_sources(cfg.data, sources),
            info.rank,
            info.world_size,
        ),
        state=state,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len)["total"],
        peak_flops=peak,
        watchdog=watchdog,
        objective=compile_objective(training_objective) if cfg.train.compile else training_objective,
    )


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


# ---- the command line -------------------------------------------------------------------------
def parse_args(argv=None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def load_config_on_every_rank(config_path: str | None, overrides: list[str]) -> RunConfig:
    """`load_config`; in a run of several processes, its refusal on some (ConfigError, DataError)
    is raised on every one, naming the rank and its host (the process group is made for it, with
    the timeout `train` would give it). The config's checks read files a node may hold alone (its
    copy of data.dir): refused on one node, the others waited at the rendezvous for its ranks,
    train.rendezvous_timeout_s (600 s), where no launcher ended them (torchrun; srun's
    --kill-on-bad-exit does)."""
    cfg, refusal = None, None
    try:
        cfg = load_config(config_path, overrides)
    except (ConfigError, DataError) as err:
        refusal = err
    try:
        if launched_world_size() == 1:
            if refusal is not None:
                raise refusal
            return cfg
        clear_stale_build_locks()  # as train() does before the process group: a killed op build would hang it
        run = (cfg or RunConfig()).train  # the defaults' where refused
        init_distributed(process_group_timeout(run), run.rendezvous_timeout_s)
    except Exception as err:
        if refusal is not None and err is not refusal:
            raise refusal from None  # this rank's own reason first (a launcher's environment may be wrong too)
        raise
    share_refusal(refusal, (ConfigError, DataError))
    return cfg


# What main() reports as "error: <message>", exit status 2, not a traceback: refusals that name their
# fix. Tools that run the trainer (tools/profile.py) report the same ones.
REFUSALS = (ConfigError, DataError, CheckpointError, SlurmEnvError, OutOfMemory, RendezvousTimeout)


def main(argv=None, stop: StopSignal | None = None) -> int:
    config_path, overrides = parse_args(argv)
    try:
        cfg = load_config_on_every_rank(config_path, overrides)
        result = train(cfg, stop)
    except REFUSALS as err:
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
    if rank == 0 and not result.not_trained:  # else train() has said why it trained nothing
        if result.stopped_by_signal:
            print(
                f"stopped at step {result.step} by signal; checkpoint {result.checkpoint}; "
                f"{'requeued' if result.requeued else 'not requeued'}"
            )
        elif result.step < cfg.train.max_steps:  # train.stop_after: the run is not finished
            print(
                f"stopped at step {result.step} of {cfg.train.max_steps} (train.stop_after); checkpoint "
                f"{result.checkpoint}; to go on, run again with train.stop_after above {result.step} "
                f"(or 0 to run to train.max_steps={cfg.train.max_steps})"
            )
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
