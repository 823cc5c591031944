"""Profile a few training steps of a config: trace file + top operators + memory-layer share.

python tools/profile.py --config configs/tiny.yaml --steps 3 train.run_dir=runs/profile
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "profile":
    # Any script run from tools/ puts this folder first on sys.path, where this file shadows the
    # standard library's `profile` (imported by cProfile, hence by torch). Load the real one in its place.
    import importlib.util
    import sysconfig

    _spec = importlib.util.spec_from_file_location("profile", Path(sysconfig.get_paths()["stdlib"]) / "profile.py")
    _real = importlib.util.module_from_spec(_spec)
    sys.modules["profile"] = _real
    _spec.loader.exec_module(_real)
elif __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def build_parser() -> argparse.ArgumentParser:
    from pretrain.cli import int_at_least, output_folder, positive_int

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument("--steps", type=positive_int, default=3, help="training steps to profile")
    parser.add_argument(
        "--skip-steps",
        type=int_at_least(0),
        default=0,
        help="first steps left out of the summary (compilation, autotuning)",
    )
    parser.add_argument(
        "--trace-dir", type=output_folder, default=None, help="where to write the trace (default <run_dir>/profile)"
    )
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.skip_steps >= args.steps:  # profile_training's own check names its arguments, not the options
        parser.error(
            f"--skip-steps {args.skip_steps} leaves none of the --steps {args.steps} to summarise: skip fewer "
            f"steps than are profiled (e.g. --steps {args.skip_steps + 3} --skip-steps {args.skip_steps})"
        )

    from pretrain.config import ConfigError, load_config
    from pretrain.data.errors import DataError

    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, DataError) as err:  # refused before torch (seconds) is imported
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pretrain.lost_peer import LostPeer
    from pretrain.profiling import format_report, profile_training
    from pretrain.train import REFUSALS

    try:
        report = profile_training(cfg, args.steps, args.trace_dir, args.skip_steps)
    # the refusals the trainer's own main reports as errors (a run_dir that is a file, a broken Slurm step)
    except (*REFUSALS, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except LostPeer as err:  # a rank of a multi-rank profile died: its output has the cause, this one a line
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
