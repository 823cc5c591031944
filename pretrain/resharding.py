"""Resuming a checkpoint on a different number of ranks (a job requeued on fewer nodes, or scaled up).

What each part of a checkpoint needs when the world size changes:
- dense weights and their optimizer state: ZeRO stage 0 keeps them whole in the model-states
  file (in bf16 too), which any world size loads. ZeRO 1-3 partition the fp32 masters and
  moments over the old ranks; DeepSpeed's *universal checkpoint* re-partitions them:
  `ds_to_universal` writes one folder per parameter, loaded with `checkpoint.load_universal`
  (`convert_to_universal`, run once by rank 0 in a subprocess);
- value shards: already read for any memory-parallel size P (`MemoryParallel.load`);
- per-rank items (data position, RNG, slot counters): every new rank reads all old ranks'
  files and each item merges them (`load_resharded` of the loader, `RNGState`, `SlotStatistics`).

The conversion is written under the checkpoints folder as `.tmp-universal-<tag>`: the
checkpoint itself is never changed, and the folder is removed with the other temporaries at
the next save.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

UNIVERSAL_PREFIX = ".tmp-universal-"
_OPTIM_FILES = "*zero_pp_rank_*_mp_rank_00_optim_states.pt"


def dense_state_is_partitioned(ckpt_dir: Path) -> bool:
    """True where the dense optimizer state is split over the old ranks (ZeRO 1-3)."""
    return any(Path(ckpt_dir).glob(_OPTIM_FILES))


def universal_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir).parent / (UNIVERSAL_PREFIX + Path(ckpt_dir).name)


def convert_to_universal(ckpt_dir: Path, saved_world: int, workers: int | None = None) -> Path:
    """Write DeepSpeed's universal form of `ckpt_dir`'s dense state beside it; return its folder.

    Runs `python -m pretrain.resharding` (DeepSpeed's converter under the weights-only
    unpickler) as a child process so that its worker pool never forks a training process."""
    from pretrain.checkpoint import CheckpointError
    from pretrain.files import atomic_path

    out = universal_dir(ckpt_dir)
    if out.is_dir():  # left by an earlier resume of the same checkpoint that stopped before saving
        return out
    workers = workers or max(1, min(4, (os.cpu_count() or 1) // 2))
    with atomic_path(out, directory=True) as tmp:
        cmd = [sys.executable, "-m", "pretrain.resharding", str(ckpt_dir), str(tmp), "--workers", str(workers)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
            raise CheckpointError(
                f"cannot re-partition the dense optimizer state of {ckpt_dir} for a new number of ranks "
                f"(DeepSpeed's ds_to_universal failed):\n{tail}\nresume with the number of ranks that saved it "
                f"({saved_world}); nothing in {ckpt_dir} was changed"
            )
    # the converter also names its output in a `latest_universal` file beside it; nothing reads that
    (out.parent / "latest_universal").unlink(missing_ok=True)
    return out


def main(argv=None) -> int:
    """Child process of `convert_to_universal`: DeepSpeed's converter, every load weights-only."""
    from pretrain.cli import positive_int

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a step_XXXXXXXX folder")
    parser.add_argument("output", help="the universal checkpoint folder to write")
    parser.add_argument("--workers", type=positive_int, default=1)
    args = parser.parse_args(argv)
    from deepspeed.checkpoint import ds_to_universal

    from pretrain.export.dense import weights_only_loads

    with weights_only_loads():
        ds_to_universal.main(
            argparse.Namespace(
                input_folder=args.checkpoint,
                output_folder=args.output,
                num_extract_workers=args.workers,
                num_merge_workers=max(1, args.workers // 2),
                keep_temp_folder=False,
                strict=True,
                # checkpoints of plain (non-Megatron) models lack the info block; the defaults fit them
                inject_missing_state=True,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
