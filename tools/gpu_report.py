"""Record what tools/gpu_check.sh brought back under benchmarks/: the raw files and a README.md.

  python tools/gpu_report.py /work/.device/<call 1's files_at> [<call 2's files_at> ...]

Each folder holds one call's files (summary.txt, the logs, results.tar.gz), given in the order the
calls ran. Writes benchmarks/<device>/<commit>/ (e.g. benchmarks/h100-sxm/cd27a1e/): the JSON,
tables and plots of every stage, the logs (joined over the calls), and README.md with the device,
date, commit, each stage's exit status and time, the numbers issues 16 and 21 ask for against
their floors, the kernel, layer and training tables and the launch-configuration winners.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.bench.gpu_report import write_report  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("calls", nargs="+", type=Path, help="each gpu_check call's folder of files, in the order they ran")
    p.add_argument("--out", type=Path, default=Path("benchmarks"), help="the records' root (default: benchmarks)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        dest = write_report(args.calls, args.out)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"written: {dest} (README.md first; add the folder and a line in benchmarks/README.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
