"""Average the weights of several exports of one run (checkpoint averaging) into a new export.

python tools/average_exports.py exports/step800 exports/step900 exports/step1000 --output exports/avg
python tools/average_exports.py exports/a exports/b --weights 1 3 --output exports/avg   # 1:3 weighted
python tools/average_exports.py exports/soup1 exports/soup2 --allow-other-runs --output exports/soup

Exports of different training runs (config.json's run_id) are refused unless --allow-other-runs
(runs begun from one export with train.init_from: a model soup); the slot table kept is then the
latest input's, which a warning names.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.cli import non_negative_number, plain_warnings  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("exports", nargs="+", help="export folders written by memlayers-export (the same model)")
    parser.add_argument("--output", required=True, help="export folder to create")
    parser.add_argument("--weights", nargs="+", type=non_negative_number(), help="one per export (default: equal)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output")
    parser.add_argument(
        "--allow-other-runs",
        action="store_true",
        help="average exports of different training runs (a model soup of runs begun from one export); "
        "the latest input's slot table is kept",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar on stderr (where stderr is not a terminal, the bar is a plain line every 30 s)",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from pretrain.export.errors import ExportError
    from pretrain.export.folders import check_export_dir

    try:
        for export_dir in args.exports:  # a missing or wrong folder refused before torch is imported
            check_export_dir(export_dir)
        from pretrain.export.averaging import average_exports

        with plain_warnings():
            out = average_exports(
                args.exports,
                args.output,
                args.weights,
                force=args.force,
                show_progress=not args.no_progress,
                allow_other_runs=args.allow_other_runs,
            )
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"averaged {len(args.exports)} exports into {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
