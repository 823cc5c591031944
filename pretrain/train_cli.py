"""The start of memlayers-train and `python -m pretrain.train`, before torch (seconds) is imported: the
stop handler is installed first, so that a USR1/SIGTERM during start-up is recorded, not fatal (train()
takes it over); then the options are parsed (--help) and, in a process that runs alone, the config is
read and checked, a refusal reported in a line (exit status 2). So is it in each of several processes
that all run on this node (torchrun, an srun step of one node), with the checks of the world size: each
exits with status 2, the node's local rank 0 alone prints the line. Then pretrain.train trains. A
process among several on more nodes reads its config there, where one rank's refusal is shared with
all (and printed by rank 0)."""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.slurm import (  # the standard library only
    SlurmEnvError,
    StopSignal,
    ctrl_c_abort_in_one_line,
    distributed_env_from_slurm,
    first_on_its_node,
    in_slurm_task,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train (or resume) a run: memlayers-train --config CONFIG key=value")
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser


def parse_args(argv=None) -> tuple[str | None, list[str]]:
    args = build_parser().parse_args(argv)
    return args.config, args.overrides


def launched_alone() -> bool:
    """No launcher started this process among others: WORLD_SIZE unset or 1, and no Slurm task (whose
    step may hold several; pretrain.distributed reads its size)."""
    return os.environ.get("WORLD_SIZE", "1") == "1" and not in_slurm_task()


def world_on_this_node(environ=None) -> int | None:
    """The launched world size where every rank runs on this node (torchrun's LOCAL_WORLD_SIZE equal to
    its WORLD_SIZE; an srun step of one node), else None. Those ranks read the same files, so a refusal
    of the config is every rank's, each can make it before torch, and none is left waiting for another
    at the rendezvous (across nodes a node's own copy of a file may differ: pretrain.train shares the
    refusal there)."""
    environ = os.environ if environ is None else environ
    if "WORLD_SIZE" in environ:  # torchrun, the deepspeed launcher (also inside an srun task)
        world = environ["WORLD_SIZE"]
        return int(world) if world.isdigit() and environ.get("LOCAL_WORLD_SIZE") == world else None
    if in_slurm_task(environ) and environ.get("SLURM_STEP_NUM_NODES", environ.get("SLURM_NNODES")) == "1":
        try:
            return int(distributed_env_from_slurm(environ)["WORLD_SIZE"])
        except SlurmEnvError:
            return None  # pretrain.distributed says what is wrong with it
    return None


def cli() -> None:
    """The console script; ends the process (pretrain.train's `cli`)."""
    stop = StopSignal(ctrl_c=True)  # Ctrl-C too stops with a checkpoint (a second one aborts, in a line)
    with ctrl_c_abort_in_one_line("the same command, started again, resumes from that checkpoint"):
        config_path, overrides = parse_args()
        cfg = None
        world = 1 if launched_alone() else world_on_this_node()
        if world is not None:
            from pretrain.config import ConfigError, check_world, load_config
            from pretrain.data.errors import DataError

            try:
                # world 1 too: model.memory.parallel_size=2 in a process alone was refused only in the build
                cfg = check_world(load_config(config_path, overrides), world)
            except (ConfigError, DataError) as err:
                if first_on_its_node():  # every rank here refuses the same: one line, each rank exit status 2
                    print(f"error: {err}", file=sys.stderr, flush=True)
                os._exit(2)  # as pretrain.train's cli ends
        from pretrain import train

        train.cli(stop, cfg)
