"""Start-up cost of the trainer's shard check (pretrain.data.checks.shard_problems: a stat per
shard, compared with the size its manifest records) on a dataset of many shards.

  python tools/bench_shard_check.py [--shards 20000] [--dir /scratch/bench] [--repeats 5]

Makes a dataset of `--shards` training shards under `--dir` (sparse files of a real shard's size,
4 MiB: 1024 sequences of 2048 tokens; nothing is read), then times the check, cold (the first
call after the files were made) and warm (the rest), and prints p50 milliseconds and microseconds
per shard. Point `--dir` at the filesystem the data lives on (a network filesystem's stat costs a
round trip; the default is a temporary folder on this machine).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.cli import help_description, output_folder, positive_int  # noqa: E402
from pretrain.data.checks import shard_problems  # noqa: E402

SHARD_BYTES = 1024 * (2048 + 1) * 2 + 1024 * 16  # a real shard's tokens and metadata, about 4 MiB


def make_dataset(root: Path, shards: int) -> SimpleNamespace:
    """A source (as resolve_sources returns one) of `shards` sparse shard files, its manifest in memory."""
    (root / "train").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(shards):
        path = root / "train" / f"shard-{i:06d}.tar"
        with open(path, "wb") as fh:
            fh.truncate(SHARD_BYTES)
        entries.append({"path": f"train/shard-{i:06d}.tar", "sequences": 1024, "bytes": SHARD_BYTES})
    manifest = {"seq_len": 2048, "token_dtype": "uint16", "splits": {"train": {"shards": entries}}}
    return SimpleNamespace(dir=root, manifest=manifest)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=help_description(__doc__))
    ap.add_argument("--shards", type=positive_int, default=20000, help="shards in the dataset made to check")
    ap.add_argument(
        "--dir",
        type=lambda text: Path(output_folder(text)),
        default=None,
        help="folder to make the dataset in, created if missing (a temporary folder if unset)",
    )
    ap.add_argument("--repeats", type=positive_int, default=5, help="timed checks after the first")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.dir is not None:  # tempfile raised FileNotFoundError for a folder not made yet
        args.dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        source = make_dataset(Path(tmp), args.shards)
        times = []
        for _ in range(args.repeats + 1):
            start = time.perf_counter()
            problems = shard_problems([source])
            times.append(time.perf_counter() - start)
        assert problems == [], problems
    warm = statistics.median(times[1:])
    print(
        f"{args.shards} shards: first check {times[0] * 1e3:.1f} ms, then p50 {warm * 1e3:.1f} ms "
        f"({warm / args.shards * 1e6:.1f} us per shard) over {args.repeats} checks"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
