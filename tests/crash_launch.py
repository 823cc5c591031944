"""Run the trainer's or the exporter's command line in a child process that a real SIGKILL ends at
a named point of a checkpoint or export write (`start`), or that the caller kills at any moment.

The point is reached through the functions the write calls (wrapped here, in this process only;
nothing in the package knows of it), so the kill lands exactly where named, which polling for a
temporary folder from outside cannot do on a write that takes milliseconds. The process then
dies as under the OOM killer or a time limit's SIGKILL: no handler, no cleanup, no flush.

Points (`step`: the checkpoint step whose save is cut; ignored by the export points):
- `deepspeed-saved`: DeepSpeed's files written into `.tmp-step_K`, the value shards, rank files,
  config and slot table not yet;
- `before-checksums`: every rank's files written, `checksums.json` not;
- `renamed`: `.tmp-step_K` renamed to `step_K`, `latest` not yet written;
- `pruning`: `latest` names step_K; the older checkpoint being pruned is half deleted;
- `recovery-script`: (ZeRO 1-3) DeepSpeed's copy of zero_to_fp32.py into the checkpoints folder, half
  written;
- `export-written`: the export's files written but its README, the folder not yet renamed;
- `export-replacing`: the finished export is replacing the old folder (`--force`), half way.

Points outside a save (`step` ignored), where a peer waits in a collective of start-up or shutdown:
- `config-shared`: the config loaded and the process group made, its refusals not yet shared;
- `deepspeed-initialize`: in the middle of the start-up (DeepSpeed's engine about to be made);
- `final-barrier`: training finished, the command line's last barrier not yet reached;
- `after-step`: step `step` finished (also where no checkpoint is saved);
- `raise-after-step`: there, a Python exception (RuntimeError) instead of the kill: the rank ends with a
  traceback and exit status 1, as a bug of its own would end it.

Under torchrun, `python -m tests.crash_launch POINT STEP RANK TRAIN-ARGS...` is the worker: rank RANK is
armed in torchrun's first attempt only (TORCHELASTIC_RESTART_COUNT=0), so that a restart runs clean.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from pathlib import Path


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _rmtree_then_die(original):
    """shutil.rmtree that deletes one file of the tree, then kills the process: a removal cut short."""

    def rmtree(path, *args, **kwargs):
        files = sorted(p for p in Path(path).rglob("*") if p.is_file())
        if files:
            files[0].unlink()
            die()
        return original(path, *args, **kwargs)

    return rmtree


def arm(point: str, step: int) -> None:
    import pretrain.checkpoint.checkpointer as checkpoint
    import pretrain.files as files

    tag = checkpoint.tag_for(step)
    if point == "deepspeed-saved":
        original = checkpoint._save_deepspeed

        def save_deepspeed(engine, save_dir, tmp_tag, client_state):
            failure = original(engine, save_dir, tmp_tag, client_state)
            if tmp_tag.endswith(tag):
                die()
            return failure

        checkpoint._save_deepspeed = save_deepspeed
    elif point == "before-checksums":
        original = checkpoint.write_checksums

        def write_checksums(folder, rank, world_size):
            if Path(folder).name.endswith(tag):
                die()
            return original(folder, rank, world_size)

        checkpoint.write_checksums = write_checksums
    elif point == "renamed":
        original = checkpoint.replace_with

        def replace_with(tmp, path):
            original(tmp, path)
            if Path(path).name == tag:
                die()

        checkpoint.replace_with = replace_with
    elif point == "pruning":
        original = checkpoint.prune_checkpoints

        def prune_checkpoints(root, keep, saved):
            if saved == tag:
                shutil.rmtree = _rmtree_then_die(shutil.rmtree)
            return original(root, keep, saved)

        checkpoint.prune_checkpoints = prune_checkpoints
    elif point == "recovery-script":
        import deepspeed.runtime.engine as engine

        original = checkpoint._save_deepspeed

        def half_a_copy_then_die(src, dst):
            data = Path(src).read_bytes()
            Path(dst).write_bytes(data[: len(data) // 2])
            die()

        def save_deepspeed(engine_, save_dir, tmp_tag, client_state):
            if tmp_tag.endswith(tag):
                engine.copyfile = half_a_copy_then_die
            return original(engine_, save_dir, tmp_tag, client_state)

        checkpoint._save_deepspeed = save_deepspeed
    elif point == "export-written":
        import pretrain.export.writer as writer

        writer.model_card = lambda *args, **kwargs: die()
    elif point == "export-replacing":
        original = files.replace_with

        def replace_with(tmp, path):
            shutil.rmtree = _rmtree_then_die(shutil.rmtree)
            return original(tmp, path)

        files.replace_with = replace_with
    elif point == "config-shared":
        import pretrain.train as train

        train.share_refusal = lambda *args: die()
    elif point == "deepspeed-initialize":
        import deepspeed

        deepspeed.initialize = lambda *args, **kwargs: die()
    elif point == "final-barrier":
        import pretrain.train as train

        original = train.train

        def train_then_die(*args, **kwargs):
            original(*args, **kwargs)
            die()

        train.train = train_then_die
    elif point in ("after-step", "raise-after-step"):
        import pretrain.watchdog as watchdog

        original = watchdog.HangWatchdog.progress

        def progress(self, what):
            original(self, what)
            if what == f"step {step}":
                if point == "raise-after-step":
                    raise RuntimeError(f"injected fault after step {step} (tests/crash_launch.py)")
                die()

        watchdog.HangWatchdog.progress = progress
    elif point != "none":
        raise SystemExit(f"unknown kill point {point!r}")


def _child(point: str, step: int, program: str, args: list[str], env: dict, log: str) -> None:
    os.environ.clear()  # a forked child has the fork server's environment
    os.environ.update(env)
    with open(log, "ab", buffering=0) as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    arm(point, step)
    if program == "train":
        from pretrain.train import cli

        sys.argv = ["memlayers-train", *args]
        cli()  # exits the process
    if program == "profile":
        from tools.profile import main as tool
    else:
        from tools.export import main as tool

    code = tool(args)
    sys.stdout.flush()
    os._exit(code)


def start(point: str, step: int, program: str, args: list[str], log: Path, **env: str):
    """A started child process running `program` ("train": pretrain.train's command line; "export":
    tools/export.py's; "profile": tools/profile.py's) with `args`, killed at `point` (see the module's docstring; "none": not
    killed there) of the save of checkpoint `step`; its output appended to `log`, `env` added to
    this environment. Forked from a server that imported torch, DeepSpeed and the trainer once."""
    import multiprocessing

    from pretrain.spawn import _PRELOAD

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)  # ignored where the server runs already (with these)
    child = context.Process(target=_child, args=(point, step, program, args, {**os.environ, **env}, str(log)))
    child.start()
    return child


def torchrun_worker(argv: list[str]) -> None:
    """A worker of `torchrun ... -m tests.crash_launch POINT STEP RANK TRAIN-ARGS...`: the trainer's command
    line, rank RANK armed at POINT of step STEP in torchrun's first attempt only."""
    point, step, rank, *args = argv
    if os.environ.get("RANK") == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        arm(point, int(step))
    from pretrain.train_cli import cli

    sys.argv = ["memlayers-train", *args]
    cli()  # exits the process


if __name__ == "__main__":
    torchrun_worker(sys.argv[1:])
