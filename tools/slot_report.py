"""Render a slot-frequency table as a PNG: sorted counts (log-log) and coverage over steps.

`memlayers-slot-report --table runs/tiny/checkpoints --out report.png` accepts a table
file or a checkpoint/export directory holding slot_frequencies.safetensors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.cli import image_file  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--table", required=True, help="slot_frequencies.safetensors or a directory holding one")
    p.add_argument("--out", required=True, type=image_file("slot_report.png"), help="PNG file to write")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    from pretrain.slots.locate import find_table

    try:
        find_table(args.table)  # a missing table refused before torch (seconds) is imported
        from pretrain.slots.table import load_table

        table = load_table(args.table)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from pretrain.slots.report import render_report

    out = render_report(table, args.out)
    print(f"wrote {out} (table {table.path}, step {table.step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
