"""What a submission checks of the run it would write, before anything is written or queued: a
new run's directory is absent or empty; a `--resume` needs the same resolved config but for
RESUME_MAY_CHANGE (`check_run_dir`), no job of the run still queued (`check_no_live_job`), steps
left to train (`check_not_finished`), and a learning-rate schedule that keeps the rates of the
steps taken (`check_schedule_change`). pretrain/launch.py runs them in `plan_run`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from pretrain.config import ConfigError, absolute_paths, config_differences
from pretrain.data.errors import DataError
from pretrain.data.sources import mixture_change
from pretrain.lr_schedule import SCHEDULE_KEYS, check_resumed_schedule
from pretrain.sbatch_script import SubmitError

CONFIG_NAME = "config.yaml"  # the resolved config, in the run directory and in each checkpoint


class RunInQueue(SubmitError):
    """--resume of a run that a queued or running job trains already."""


class RunFinished(SubmitError):
    """--resume of a run whose latest checkpoint is at train.max_steps: nothing left to train."""


# What a resubmitted run may change: how its data is read (the trainer re-plans the data
# position for them, pretrain.resharding), how a hang is handled (pretrain/watchdog.py), and
# the learning-rate schedule where the steps already taken keep their rates (an extended
# warmup-stable-decay run; pretrain/lr_schedule.py, checked below and again by the trainer).
# The training data may change too (`mixture_change`: sources added, removed or reweighted),
# and how the model runs where the checkpoint does not depend on it (what lowers the memory per
# rank, pretrain/out_of_memory.py). The world size is not in the config at all.
RESUME_MAY_CHANGE = (
    # how often the run logs, evaluates and checkpoints, and where it stops: no saved state
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.probe_limit",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.stop_after",
    "slots.log_every",
    "train.micro_batch",
    "data.num_workers",
    "data.shuffle_buffer",
    "train.hang_timeout_s",
    "train.startup_timeout_s",
    "train.rendezvous_timeout_s",
    "train.requeue_on_hang",
    "train.lost_peer_grace_s",
    *SCHEDULE_KEYS,
    "optim.allow_schedule_change",
    "train.init_from",  # read only by a run's start, never by a resume
    # pretrain.config.MODEL_RUNTIME_KEYS, which checkpoint.check_compatible ignores: the same math
    # (kernel, document_attention), value shards re-split on load (parallel_size)
    "model.memory.kernel",
    "model.memory.parallel_size",
    "model.document_attention",
    "train.activation_checkpointing",  # recomputation only: no state
    "train.activation_checkpointing_layers",
)


def check_run_dir(run_dir: Path, config_path: Path, config_text: str, resume: bool, workdir: Path) -> None:
    """A new run needs an absent or empty run dir; --resume needs this tool's run dir with the
    same resolved config, but for RESUME_MAY_CHANGE. Relative paths in a config saved before
    they were saved absolute are read against `workdir`."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise SubmitError(f"train.run_dir={run_dir} exists and is not a directory: choose another train.run_dir")
        existing = config_path.read_text() if config_path.is_file() else None
        if resume:
            if existing is None:
                raise SubmitError(
                    f"--resume: {run_dir} holds no {CONFIG_NAME}, so it is not a run directory made by this tool"
                )
            old = OmegaConf.to_container(absolute_paths(OmegaConf.create(existing), workdir))
            new = OmegaConf.to_container(OmegaConf.create(config_text))
            changed = set(config_differences(old, new)) - set(RESUME_MAY_CHANGE)
            try:
                data_change = mixture_change(old["data"], new["data"])
            except DataError as err:
                raise SubmitError(f"--resume: {err}") from None
            if data_change:  # e.g. an annealing mixture for the decay
                changed -= {"data.sources", "data.dir"}
            from pretrain.checkpoint import ZERO_STAGES_INTERCHANGEABLE

            if {old["train"].get("zero_stage"), new["train"]["zero_stage"]} <= ZERO_STAGES_INTERCHANGEABLE:
                changed.discard("train.zero_stage")
            changed = sorted(changed)
            if changed:
                paths = [k for k in changed if k in ("data.dir", "data.cache_dir", "data.sources", "data.eval_sources")]
                where = f"; relative paths are read in the working directory {workdir}: pass the run's --workdir"
                raise SubmitError(
                    f"--resume: the resolved config differs from {config_path} in {', '.join(changed)} (a different "
                    f"run): resubmit with the same config and overrides (only {', '.join(RESUME_MAY_CHANGE)} may "
                    "change, and train.zero_stage between 1 and 2), or choose a new train.run_dir"
                    + (where if paths else "")
                )
        elif any(run_dir.iterdir()):
            raise SubmitError(
                f"train.run_dir={run_dir} already exists and is not empty (another run's directory): pass --resume "
                "to continue that run with the same config, or set train.run_dir=<new path>"
            )
    elif resume:
        raise SubmitError(f"--resume: {run_dir} does not exist: submit without --resume to start this run")


def check_no_live_job(script_path: Path, squeue_bin: str = "squeue") -> None:
    """Refuse a --resume while a job of this run (its train.sbatch) is still queued, running or
    requeued: two jobs would train the same run directory at once, each pruning and overwriting
    the other's checkpoints. Where squeue is absent (no Slurm here: --dry-run) this goes on
    silently, where it fails with a warning; sbatch itself then fails with its own message."""
    exe = shutil.which(squeue_bin)
    if exe is None:
        return
    result = subprocess.run(
        [exe, "--me", "--noheader", "--format=%i|%T|%o"], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        message = result.stderr.strip() or "(no output)"
        print(
            f"memlayers-submit: warning: could not check for a job of {script_path.parent} still in the queue "
            f"(`squeue` exit {result.returncode}: {message})",
            file=sys.stderr,
        )
        return
    live = []
    for line in result.stdout.splitlines():
        job_id, _, rest = line.partition("|")
        state, _, command = rest.partition("|")  # the command (the script's path) may itself hold '|'
        if command == str(script_path):
            live.append((job_id, state))
    if live:
        raise RunInQueue(
            f"--resume: job {', '.join(f'{job} ({state})' for job, state in live)} of {script_path.parent} is still "
            "in the queue; a second job would train the same run directory at the same time, each pruning and "
            "overwriting the other's checkpoints. Wait for it to end, or end it first "
            f"({'; '.join(_how_to_end(job, state) for job, state in live)}) and resubmit once squeue no longer lists it"
        )


# squeue states (%T) of a job whose batch script has not started: no trainer, nothing to save
_NOT_STARTED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"})


def _how_to_end(job_id: str, state: str) -> str:
    """How to end a queued job of the run, and what that costs, as true for its squeue state."""
    if state == "RUNNING":
        return f"`scancel {job_id}`: the trainer saves a checkpoint on the way out"
    if state in _NOT_STARTED:
        return f"`scancel {job_id}`: it has not started, nothing to save"
    if state == "COMPLETING":
        return f"job {job_id} is ending already"
    return f"`scancel {job_id}`"


def check_not_finished(run_dir: Path, cfg) -> None:
    """A run whose latest checkpoint is at train.max_steps has nothing left to train: its job would
    wait in the queue, load the checkpoint and end. Refuse it, naming how to extend the run."""
    from pretrain.checkpoint import CheckpointError, latest_checkpoint, step_of

    try:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
    except CheckpointError as err:
        raise SubmitError(f"--resume: {err}") from None
    step = step_of(checkpoint) if checkpoint is not None else None
    if step is not None and step >= cfg.train.max_steps:
        raise RunFinished(
            f"--resume: {run_dir} is finished: its latest checkpoint {checkpoint.name} is at step {step} and "
            f"train.max_steps={cfg.train.max_steps}, so the job would have nothing to train; raise "
            "train.max_steps to extend the run, or choose a new train.run_dir"
        )


def check_schedule_change(run_dir: Path, cfg) -> None:
    """Refuse now, not after the queue, a schedule that gives the steps the latest checkpoint
    took other learning rates (the trainer would refuse it at start)."""
    from pretrain.checkpoint import CheckpointError, latest_checkpoint, step_of
    from pretrain.export.errors import ExportError
    from pretrain.export.source import load_run_config

    try:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None or step_of(checkpoint) is None:
            return
        saved = load_run_config(checkpoint / CONFIG_NAME)
        check_resumed_schedule(saved, cfg, step_of(checkpoint), checkpoint.name)
    except (CheckpointError, ExportError, ConfigError) as err:
        raise SubmitError(f"--resume: {err}") from None
