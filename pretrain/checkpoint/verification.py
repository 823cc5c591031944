"""Checking, before a resume loads anything, that every file of a checkpoint it will read is
present, whole and readable with the weights-only unpickler; and the refusal of a damaged one,
naming the newest earlier checkpoint that passes the same checks."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from pretrain.checkpoint.layout import CheckpointError, checkpoint_folders, rank_file, step_of
from pretrain.checksums import checksum_problem, unreadable


def verify(ckpt_dir: Path, world_size: int, dataset_dir: Path | None = None, rank: int | None = None):
    """Check every file a resume with `world_size` ranks reads: present, whole, readable with
    the weights-only unpickler; return what `export.source.inspect` found (the saving world
    size, step, config). The
    per-rank files `rank` reads (ours, and ZeRO's optimizer and stage-3 model states) are parsed
    weights-only: its own, or all of them when the world size changed (DeepSpeed's on rank 0, which
    converts them); the others are checked for completeness. Raises CheckpointError naming the first bad file."""
    from pretrain.export.dense import weights_only_loads
    from pretrain.export.errors import ExportError
    from pretrain.export.source import check_torch_zip, inspect

    try:
        # config, DeepSpeed files (model states read weights-only), value shards, table
        source = inspect(ckpt_dir, dataset_dir)
        saved_world = source.dp_world_size
        for other in range(saved_world):
            check_torch_zip(rank_file(ckpt_dir, other))
        if rank is not None:
            readers = [rank] if saved_world == world_size else range(saved_world)
            for other in readers:
                path = rank_file(ckpt_dir, other)
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # parsed; tensors not read
            # DeepSpeed's partitioned files, parsed where its load reads them: this rank's own, or all
            # of them on rank 0, which converts them alone when the world size changed
            readers = [rank] if saved_world == world_size else range(saved_world) if rank == 0 else []
            partitioned = [source.optim_files[r] for r in readers if source.optim_files]
            if source.zero_stage == 3:
                partitioned += [ckpt_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in readers]
            with weights_only_loads():
                for path in partitioned:
                    torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except ExportError as err:
        raise CheckpointError(str(err)) from None
    except OSError as err:  # raised on the rank that met it (its node's mount, a flaky read): told to all by the caller
        raise CheckpointError(unreadable(err)) from None
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise CheckpointError(
            f"{path} cannot be read as tensors and plain values (refused, nothing in it executed): {err}"
        ) from None
    return source


def resume_refusal(
    ckpt_dir: Path, problem: str, world_size: int, dataset_dir: Path | None, rank: int | None = None
) -> str:
    """The message for a damaged checkpoint: the file, and the newest earlier checkpoint that passes
    the checks `rank`'s resume would make of it."""
    step = step_of(ckpt_dir)
    older = [p for p in checkpoint_folders(ckpt_dir.parent) if p != ckpt_dir and (step is None or step_of(p) < step)]
    older.reverse()  # the newest first
    usable = None
    for candidate in older:
        try:
            verify(candidate, world_size, dataset_dir, rank)
        except CheckpointError:
            continue
        if checksum_problem(candidate, collective=False) is None:  # on one rank only, maybe: no collective
            usable = candidate
            break
    if usable is not None:
        fix = (
            f"to resume from the previous complete checkpoint, move {ckpt_dir} aside and write "
            f"'{usable.name}' into {ckpt_dir.parent / 'latest'}"
        )
    else:
        fix = f"no earlier complete checkpoint exists: restore {ckpt_dir} from a copy, or use a new train.run_dir"
    return f"cannot resume from checkpoint {ckpt_dir}: {problem}. Nothing was loaded or changed; {fix}"
