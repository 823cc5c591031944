"""Training a run: `python -m pretrain.train --config configs/tiny.yaml key=value ...`.

`train` = the process group and the hang watchdog (pretrain/watchdog.py, told of every step and
periodic action) -> `build` (pretrain/build.py: data, run directory, model + DeepSpeed engine +
`Optimizers`, loaders, slot counters, metrics, evaluation, in a `Trainer`; the checkpoint's items
declared) -> `Trainer.resume` -> `Trainer.fit`, the loop (pretrain/trainer.py). Then the command
line: `main` reports a refusal as one line (exit status 2), as it does a rank lost mid-run (exit
status 1, pretrain/lost_peer.py); `cli` ends the process. The console script starts in
pretrain/train_cli.py (stop handler, options, config), before this module's imports (torch, seconds).
"""

from __future__ import annotations

import os
import sys
import time

from pretrain.slurm import SlurmEnvError, StopSignal  # the standard library only

if __name__ == "__main__":
    # `python -m pretrain.train` (the sbatch templates): the stop handler and the config's checks come
    # before the heavy imports below (seconds); pretrain.train_cli then imports this file as a module
    from pretrain.train_cli import cli

    cli()  # ends the process

import torch.distributed as dist  # noqa: E402

from kernels.build_locks import clear_stale_build_locks  # noqa: E402
from pretrain.build import LoaderFactory, NothingToTrain, build, build_loader  # noqa: E402
from pretrain.checkpoint import CheckpointError  # noqa: E402
from pretrain.config import ConfigError, RunConfig, TrainConfig, load_config, validate  # noqa: E402
from pretrain.data.errors import DataError  # noqa: E402
from pretrain.distributed import (  # noqa: E402
    DistInfo,
    RendezvousTimeout,
    init_distributed,
    launched_world_size,
    rank0_value,
    reports_refusal,
    share_refusal,
)
from pretrain.lost_peer import LocalPeerWatch, LostPeer, explain_lost_peer, lost_peer, since_progress  # noqa: E402
from pretrain.out_of_memory import OutOfMemory, explain_out_of_memory  # noqa: E402
from pretrain.peak_memory import IntervalPeak  # noqa: E402
from pretrain.run_lock import RunDirLock  # noqa: E402
from pretrain.torchrun_restarts import repeats_on_restart  # noqa: E402
from pretrain.train_cli import build_parser, parse_args  # noqa: E402, F401 (build_parser: the options of this command)
from pretrain.trainer import TrainingDiverged, TrainResult  # noqa: E402
from pretrain.watchdog import HangWatchdog  # noqa: E402


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
        device_memory = IntervalPeak(info.device)
        device_memory.reset("this run started")
        lock = RunDirLock(cfg.train.run_dir, info.is_main)
        with explain_lost_peer(cfg.train.run_dir, since_progress(None)):  # rank 0's start time, a collective
            watchdog = hang_watchdog(cfg, info)
        where = since_progress(watchdog)
        with (
            watchdog,
            LocalPeerWatch(cfg.train.run_dir, where, grace_s=cfg.train.lost_peer_grace_s),
            explain_lost_peer(cfg.train.run_dir, where),
            explain_out_of_memory(cfg, info, watchdog, device_memory),
        ):
            try:
                trainer = build(cfg, info, loaders or build_loader, watchdog, lock)
            except NothingToTrain as done:
                if info.is_main:
                    print(done.result.not_trained, flush=True)
                return done.result
            trainer.save_checkpoints, trainer.device_memory = save_checkpoints, device_memory
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


def process_group_timeout(t: TrainConfig) -> float:
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


# ---- the command line (its start, before torch: pretrain/train_cli.py) -----------------------------
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
    if cfg is None:  # refused here: this rank's own reason, whether or not a peer is left to be told
        try:
            share_refusal(refusal, (ConfigError, DataError))
        except RuntimeError as err:
            if not lost_peer(err)[0]:
                raise
        raise refusal
    with explain_lost_peer(cfg.train.run_dir, lambda: "while the ranks checked the config"):
        share_refusal(refusal, (ConfigError, DataError))
    return cfg


# What main() reports as "error: <message>", exit status 2, not a traceback: refusals that name their
# fix. Tools that run the trainer (tools/profile.py) report the same ones.
REFUSALS = (ConfigError, DataError, CheckpointError, SlurmEnvError, OutOfMemory, RendezvousTimeout)


def main(argv=None, stop: StopSignal | None = None, cfg: RunConfig | None = None) -> int:
    """`cfg`: the config of argv, where pretrain/train_cli.py read it already (in a process that runs alone)."""
    config_path, overrides = parse_args(argv)
    try:
        if cfg is None:
            cfg = load_config_on_every_rank(config_path, overrides)
        result = train(cfg, stop)
    except REFUSALS as err:
        if reports_refusal(err):  # a refusal shared with every rank: rank 0's line, and its note
            print(f"error: {err}", file=sys.stderr)
            if not isinstance(err, RendezvousTimeout):  # a rank that did not come may come to a restart
                say_a_restart_repeats_it()
        return 2
    except TrainingDiverged as err:
        print(f"training stopped: {err}", file=sys.stderr)
        say_a_restart_repeats_it()
        return 1
    except LostPeer as err:  # another rank's process ended: its output has the cause, this one a line
        print(f"error: {err}", file=sys.stderr)
        return 1
    if dist.is_initialized():
        # A clean shutdown: a rank that exits while the process group's threads still run
        # can abort in C++ ("terminate called without an active exception"), failing the job.
        try:
            ended = f"after this run ended at step {result.step}"
            with explain_lost_peer(cfg.train.run_dir, lambda: ended, finished=result.step >= cfg.train.max_steps):
                dist.barrier()
        except LostPeer as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        rank = dist.get_rank()
        dist.destroy_process_group()
    else:
        rank = 0
    if rank == 0 and not result.not_trained:  # else train() has said why it trained nothing
        print(ending_line(result, cfg.train.max_steps))
    return 0


def say_a_restart_repeats_it() -> None:
    """After a refusal under `torchrun --max-restarts` with restarts left: torchrun restarts every rank
    into the same stop (a config refused 3 times in a second, a run that diverges at step N retraining
    from its checkpoint each time); only torchrun's own summary said so, as a failure like any other."""
    note = repeats_on_restart()
    if note:
        print(note, file=sys.stderr)


def ending_line(result: TrainResult, max_steps: int) -> str:
    """Rank 0's last line: where the run stopped, its checkpoint, and how it goes on."""
    if result.stopped_by_signal:
        if result.requeued:
            after = "requeued"
        elif os.environ.get("SLURM_JOB_ID"):  # rank 0 has said why (SIGTERM, no scontrol, a refused requeue)
            after = "not requeued"
        else:
            after = "not a Slurm job, so not requeued: run the same command again to resume from it"
        return f"stopped at step {result.step} by signal; checkpoint {result.checkpoint}; {after}"
    if result.step < max_steps:  # train.stop_after: the run is not finished
        return (
            f"stopped at step {result.step} of {max_steps} (train.stop_after); checkpoint "
            f"{result.checkpoint}; to go on, run again with train.stop_after above {result.step} "
            f"(or 0 to run to train.max_steps={max_steps})"
        )
    return f"finished at step {result.step}; checkpoint {result.checkpoint}"


def cli(stop: StopSignal | None = None, cfg: RunConfig | None = None) -> None:
    """`python -m pretrain.train` / `memlayers-train` (through pretrain/train_cli.py, which installs `stop`
    and reads `cfg` before torch is imported): main(), then exit without interpreter teardown.

    By then the process group is destroyed and every checkpoint, table and event file is
    closed; what teardown would still do is destroy C++ objects of gloo and DeepSpeed's
    shared-memory op, where a rank occasionally aborts ("terminate called without an
    active exception"), failing a finished job under srun.
    """
    code = main(stop=stop if stop is not None else StopSignal(ctrl_c=True), cfg=cfg)  # called directly: installed here
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
