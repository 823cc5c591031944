"""The start of memlayers-train and `python -m pretrain.train`, before torch (seconds) is imported: the
stop handler is installed first, so that a USR1/SIGTERM during start-up is recorded, not fatal (train()
takes it over); then the options are parsed (--help) and, in a process that runs alone, the config is
read and checked, a refusal reported in a line (exit status 2). Then pretrain.train trains. A process
among several (torchrun, srun) reads its config there, where one rank's refusal is shared with all."""

from __future__ import annotations

import argparse
import os
import sys

from pretrain.slurm import StopSignal, ctrl_c_abort_in_one_line, in_slurm_task  # the standard library only


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


def cli() -> None:
    """The console script; ends the process (pretrain.train's `cli`)."""
    stop = StopSignal(ctrl_c=True)  # Ctrl-C too stops with a checkpoint (a second one aborts, in a line)
    with ctrl_c_abort_in_one_line("the same command, started again, resumes from that checkpoint"):
        config_path, overrides = parse_args()
        cfg = None
        if launched_alone():
            from pretrain.config import ConfigError, load_config
            from pretrain.data.errors import DataError

            try:
                cfg = load_config(config_path, overrides)
            except (ConfigError, DataError) as err:
                print(f"error: {err}", file=sys.stderr, flush=True)
                os._exit(2)  # as pretrain.train's cli ends
        from pretrain import train

        train.cli(stop, cfg)
