"""Profile a few training steps of a config: trace file + top operators + memory-layer share.

  python tools/profile.py --config configs/tiny.yaml --steps 3 train.run_dir=runs/profile
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script, this file's folder comes first on sys.path and "profile.py" would
    # shadow the standard library's `profile` module (imported by cProfile, hence torch).
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))
    sys.modules.pop("profile", None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (e.g. configs/tiny.yaml)")
    parser.add_argument("--steps", type=int, default=3, help="training steps to profile")
    parser.add_argument("--trace-dir", default=None, help="where to write the trace (default <run_dir>/profile)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    args = parser.parse_args(argv)

    from pretrain.config import ConfigError, load_config
    from pretrain.profiling import format_report, profile_training

    try:
        cfg = load_config(args.config, args.overrides)
        report = profile_training(cfg, args.steps, args.trace_dir)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
