"""What flushing a checkpoint to disk costs (pretrain.files.flush_to_disk, run by every commit):
the tiny CPU config's checkpoint save timed with the fsyncs and without them, side by side.

  python tools/bench_checkpoint_save.py [--config configs/tiny.yaml] [--saves 8] [--dir /scratch/bench]

Trains `--saves` steps with a checkpoint at each (train.keep_checkpoints=1, so each save also prunes
the previous one, as a long run does), once as shipped and once with fsync made a no-op, and prints
the p50 and max milliseconds of `Checkpointer.save` and the checkpoint's size. Point `--dir` at the
filesystem the run directories live on (the default is a temporary folder on this machine): the
cost is the time the disk takes to write what the save wrote, which the page cache otherwise hides.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import Checkpointer, latest_checkpoint  # noqa: E402
from pretrain.cli import help_description, output_folder, positive_int  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.train import train  # noqa: E402


def timed_saves(config: Path | None, run_dir: Path, saves: int) -> tuple[list[float], int]:
    """The seconds of each checkpoint save of a run of `saves` steps, and the last checkpoint's bytes."""
    seconds, save = [], Checkpointer.save

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return save(self, *args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    overrides = [f"train.run_dir={run_dir}", f"train.max_steps={saves}", "train.checkpoint_every=1"]
    overrides += ["train.keep_checkpoints=1", "train.eval_every=100000", f"data.cache_dir={run_dir.parent / 'data'}"]
    Checkpointer.save = timed
    try:
        train(load_config(config, overrides))
    finally:
        Checkpointer.save = save
    folder = latest_checkpoint(run_dir / "checkpoints")
    return seconds, sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=help_description(__doc__))
    p.add_argument(
        "--config",
        type=Path,
        default=Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml",
        help="the run config whose model and optimizer state are saved",
    )
    p.add_argument("--saves", type=positive_int, default=8, help="timed saves per variant")
    p.add_argument(
        "--dir", type=output_folder, default=None, help="where the runs are written (default: a temporary folder)"
    )
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    real_fsync = os.fsync
    variants = {"fsync": real_fsync, "no fsync": lambda fd: None, "fsync again": real_fsync}  # again: order effects
    results = {}
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        for variant, fsync in variants.items():
            os.fsync = fsync  # what pretrain.files calls
            try:
                results[variant] = timed_saves(args.config, Path(scratch) / variant.replace(" ", "-"), args.saves)
            finally:
                os.fsync = real_fsync
    for variant, (seconds, size) in results.items():
        print(
            f"{variant:>12}: checkpoint save p50 {1000 * statistics.median(seconds):7.1f} ms, "
            f"max {1000 * max(seconds):7.1f} ms over {len(seconds)} saves of {size / 2**20:.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
