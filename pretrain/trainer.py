"""The training loop: `Trainer.fit` over the parts pretrain/build.py made for a run.

`fit`: `train_step` (micro-batches: forward, backward, count slot accesses; then clip and one
`Optimizers.step`, skipped on a non-finite loss, and the step's slot accesses with it),
`record_step` (the `TrainState`), the periodic work each due by its own `Every` cadence (log,
slot statistics, evaluate, checkpoint), and the stop check. `resume` restores the checkpointed items before it;
`result` is what `train` (pretrain/train.py) returns. No callback framework. The log's lines are
pretrain/progress_log.py's; the evaluation, pretrain/evaluate.py's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import record_function

from kernels.shared_builds import builds_since
from pretrain import profiler_regions as regions
from pretrain.cadence import Every
from pretrain.checkpoint import Checkpointer
from pretrain.config import RunConfig
from pretrain.data.errors import DataError
from pretrain.data.loader import IGNORE_INDEX
from pretrain.data.loader_failures import LOADER_FAILURES, loader_failure
from pretrain.distributed import DistInfo, gather_floats, global_sum, share_refusal
from pretrain.evaluate import EvaluationStopped, Evaluator
from pretrain.lr_schedule import lr_multiplier
from pretrain.metrics import MetricsLogger
from pretrain.model import Objective
from pretrain.optimizers import GradNorms, Optimizers
from pretrain.peak_memory import IntervalPeak
from pretrain.progress_log import log_progress, log_slot_statistics, tokens_seen_per_source
from pretrain.slots.table import TABLE_FILENAME
from pretrain.step_clock import StepClock
from pretrain.torchrun_restarts import this_attempt
from pretrain.train_state import TrainState
from pretrain.watchdog import HangWatchdog


class TrainingDiverged(RuntimeError):
    """A non-finite loss under nan_policy=stop (or too many skipped steps); a checkpoint was saved."""


def first_step_line(step: int, seconds: float, builds: list[tuple[str, float]]) -> str:
    """The log line of this run's first step: its time, and the op builds in it (`builds`, op name and
    seconds; each also said in a `memlayers: building ...` line), which are no compilation of the step."""
    work = "compilation, start-up"
    if builds:
        spent = "; ".join(f"{seconds_built:.1f} s on the build of {name}" for name, seconds_built in builds)
        work = f"{spent}; the rest {work}"
    return (
        f"step {step}: this run's first step took {seconds:.2f} s ({work}), left out of tokens/s, MFU and the "
        "data-wait share"
    )


@dataclass
class TrainResult:
    """What `train` returns: where the run ended and this run's record (the loop's own state
    is the `TrainState`)."""

    step: int
    tokens_seen: int
    skipped_steps: int
    losses: list[float] = field(default_factory=list)  # per step, in order, this run only
    # seconds per step (batch to update), this run; on a GPU from CUDA events, the step's last kernel included
    step_times: list[float] = field(default_factory=list)
    first_loss: float | None = None
    eval: dict = field(default_factory=dict)
    checkpoint: str | None = None
    slot_table: str | None = None
    stopped_by_signal: bool = False
    requeued: bool = False
    peak_memory_bytes: int | None = None  # this run's peak (CUDA max allocated, or peak RSS); None: not trained
    not_trained: str | None = None  # why the run stopped before training (train.stop_after already reached)


@dataclass
class StepOutput:
    """What one optimizer step reports: the loss (its mean over the step's scored targets, all
    ranks), whether the update was applied (else it was skipped: a non-finite loss or gradient
    norm), the gradient norms, the schedule's multiplier and the step's start (its duration is
    the `StepClock`'s)."""

    loss: float
    applied: bool
    norms: GradNorms
    multiplier: float  # of the learning-rate schedule
    start: float  # time.perf_counter() at the step's start
    z_loss: float | None = None  # the log(Z)^2 term (the same mean), when optim.z_loss > 0


@dataclass
class Trainer:
    """What `build` (pretrain/build.py) made for one run, and the run's progress (`state`, saved
    with checkpoints)."""

    cfg: RunConfig
    info: DistInfo
    engine: Any  # the DeepSpeed engine around the model's dense part
    optimizers: Optimizers
    train_loader: Any
    stats: Any  # SlotStatistics, or None when slot statistics are off
    lookups: Any  # LookupRecorder handing each micro-batch's slot indices to `stats` (None with it)
    shared_table_stream: bool  # `stats` also counts a shared value table, all its layers joined
    checkpointer: Checkpointer
    resume_from: Path | None
    metrics: MetricsLogger
    evaluator: Evaluator
    state: TrainState
    flops_per_token: float  # of forward + backward, for the MFU
    peak_flops: float | None  # one device's peak FLOP/s (train.peak_flops or the GPU's); None: no MFU
    watchdog: HangWatchdog  # told of every step, evaluation and checkpoint
    objective: Callable[..., Objective]  # the model's loss: training_objective, compiled under train.compile
    losses: list[float] = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    checkpoint: Path | None = None
    stopped_by_signal: bool = False
    requeued: bool = False
    save_checkpoints: bool = True  # False: save_checkpoint does nothing (train(save_checkpoints=...))
    device_memory: IntervalPeak | None = None  # peak device memory per log interval and of the run (train()'s)
    stop: Any = None  # fit's StopSignal: the evaluation asks it between batches, the loop after each step

    def __post_init__(self):
        if self.device_memory is None:
            self.device_memory = IntervalPeak(self.info.device)
        self.clock = StepClock(self.info.device)  # each step's seconds: TrainResult.step_times
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
        """Train from the state's step to train.max_steps, or until `stop` (a StopSignal) is
        signalled or train.stop_after is reached; what the run did."""
        self.stop = stop
        leave_dead_workers_to_the_loader()
        batches = iter(self.train_loader)
        self.device_memory.reset(f"training began at step {self.state.step}")  # the run's peak keeps start-up's
        self.interval_start = time.perf_counter()  # after building and resuming
        while self.state.step < self.cfg.train.max_steps:
            self.last_step = self.train_step(batches)
            self.record_step(self.last_step)  # a non-finite loss: skipped, or TrainingDiverged
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
        start, started = time.perf_counter(), self.clock.start()
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
        # all-reduce the step makes anyway, and all raise its DataError (raised on that rank alone,
        # the others would wait for it in this all-reduce until the hang watchdog fired)
        total = global_sum(sum(scored) if unreadable is None else -(2**62))
        if total < 0:
            share_refusal(unreadable, (DataError,))
        scale = self.micro_batches * self.info.world_size
        losses, z_terms = [], []
        for i, (batch, n) in enumerate(zip(step_batches, scored)):
            micro_loss, micro_z = self.forward_backward(
                batch, last_micro_batch=i == self.micro_batches - 1, scale=n * scale / total if total else 0.0
            )
            losses.append(micro_loss)
            z_terms.append(micro_z)
        loss = rank_share(losses, scored, total, self.info.device)
        z = rank_share(z_terms, scored, total, self.info.device) if self.cfg.optim.z_loss else None
        loss, finite, z_mean = global_step_loss(loss.float(), z)
        norms = self.optimizers.clip()
        with record_function(regions.STEP):
            applied = self.optimizers.step(multiplier, skip=not (finite and norms.finite()))
        if self.stats is not None and not applied:
            self.stats.discard_step()  # the update is skipped: so are the step's slot accesses
        self.clock.stop(started, time.perf_counter() - start)
        return StepOutput(loss, applied, norms, multiplier, start, z_mean)

    def leave_out_first_step(self) -> None:
        """This run's first step compiles, initialises lazily (DeepSpeed, the kernels) and starts the
        loader's workers: its time is logged on its own (perf/first_step_time_s) and the throughput
        clock (tokens/s, MFU, the data-wait share) starts after it."""
        self.clock.settle()  # its queued kernels are its own, not the next interval's
        now = time.perf_counter()
        self.first_step_time = now - self.interval_start
        self.metrics.scalars({"perf/first_step_time_s": self.first_step_time}, self.state.step)
        self.metrics.line(first_step_line(self.state.step, self.first_step_time, builds_since(self.interval_start)))
        self.interval_start, self.interval_steps, self.interval_data_wait = now, 0, 0.0

    def run_periodic(self) -> None:
        """The log, slot statistics, evaluation and checkpoint due after this step. Their time is
        kept off the throughput clock: tokens/s, MFU and the data-wait share are of training."""
        for every, action in self.periodic:
            if every.due(self.state.step):
                if action != self.log:
                    self.clock.settle()  # the training work still queued is not the pause's
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

    def forward_backward(self, batch, last_micro_batch: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    def record_step(self, out: StepOutput) -> None:
        """Advance the train state by the step; a skipped step is logged (its tokens are drawn from
        the data but not trained on: tokens_seen leaves them out, as the slot table does), and past
        the policy's limit a checkpoint is saved and TrainingDiverged raised."""
        t, state = self.cfg.train, self.state
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
        self.clock.settle()  # the interval's queued kernels finish in it (a wait per log, not per step)
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
            memory_bytes=self.device_memory.read(),
            tokens_by_source=tokens_seen_per_source(self.train_loader),
            data_wait=data_wait,
            z_loss=out.z_loss,
        )
        self.device_memory.reset(f"the log at step {self.state.step}")
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
            self.metrics.flush_to_disk()  # TensorBoard's log up to this step reaches the disk before the checkpoint
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
        restart = this_attempt()  # torchrun --max-restarts: which restart this is, said on the resume's line
        if self.resume_from is not None:
            resharded = self.checkpointer.load(self.resume_from)
            self.metrics.resumed_at(self.state.step)
            attempt = f" ({restart})" if restart else ""
            self.metrics.line(f"resumed from {self.resume_from} at step {self.state.step}{attempt}")
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
        elif restart:
            self.metrics.line(f"{restart}: no checkpoint to resume from yet, training starts from step 0")

    def result(self) -> TrainResult:
        s = self.state
        return TrainResult(
            step=s.step,
            tokens_seen=s.tokens_seen,
            skipped_steps=s.skipped_steps,
            losses=self.losses,
            step_times=self.clock.settle(),
            first_loss=self.losses[0] if self.losses else None,
            eval=self.last_eval,
            checkpoint=str(self.checkpoint) if self.checkpoint is not None else None,
            slot_table=str(self.checkpoint / TABLE_FILENAME) if self.checkpoint and self.stats is not None else None,
            stopped_by_signal=self.stopped_by_signal,
            requeued=self.requeued,
            peak_memory_bytes=max(self.device_memory.read(), self.device_memory.run_peak),  # with the last interval's
        )


# ---- the loop's helpers ---------------------------------------------------------------------
def global_step_loss(loss: torch.Tensor, z: torch.Tensor | None = None) -> tuple[float, bool, float | None]:
    """The step's loss summed over ranks, whether every rank's loss was finite, and the sum of
    the z-loss term `z` over ranks (None without one). Each rank passes its share: its
    micro-batches' means weighted by their scored targets over the step's (all ranks') total,
    so the sum is the mean over every scored target of the step.

    One small all-reduce read on the host, needed every step: the skip decision precedes the
    update, and the logged loss is the same read (tests/train/test_host_syncs.py lists the step's
    other host reads).
    """
    values = torch.stack([loss.float(), (~torch.isfinite(loss)).float(), z.float() if z is not None else loss * 0])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    value, nonfinite, z_sum = values.tolist()
    return value, nonfinite == 0, z_sum if z is not None else None


def rank_share(means: list, scored: list[int], total: int, device: torch.device) -> torch.Tensor:
    """This rank's share of a step's mean over its `total` scored targets (all ranks): its
    micro-batches' `means`, each weighted by its `scored` targets / `total`. A micro-batch without
    a scored target (its mean NaN) adds nothing; a step without any gives NaN (skipped)."""
    share = torch.zeros((), device=device)
    for mean, n in zip(means, scored):
        if n:
            share = share + mean.float() * (n / total)
    return share if total else torch.full((), float("nan"), device=device)


def leave_dead_workers_to_the_loader() -> None:
    """torch's DataLoader installs, once per process, a SIGCHLD handler that raises a dead worker's
    error wherever the main thread is, inside a collective too, where that rank alone left the
    others waiting for it (measured: raised from the slot statistics' all-reduce). Marked as
    installed, it is not: the loader finds the dead worker itself, within 5 s, in the wait for the
    next batch, where `Trainer.step_batches` tells every rank."""
    from torch.utils.data._utils import signal_handling

    signal_handling._SIGCHLD_handler_set = True
