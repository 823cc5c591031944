"""Checks of a prepared dataset that the trainer runs at start-up, before any heavy work:
what the loader would otherwise only find out at the first evaluation, hours later."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np

from pretrain.data.errors import DataError
from pretrain.data.shards import read_manifest
from pretrain.words import counted


def check_trainable(sources: list) -> None:
    """Raise DataError naming the dataset and the fix if the trainer cannot use the sources: a
    source with an empty train split, or no validation split in any source (the trainer
    evaluates on them; a mixture's source without one is skipped at evaluation, and said so)."""
    for source in sources:
        _check_split(source.dir, "train", "check --input")
    if not any(source.has_validation for source in sources):
        _check_split(sources[0].dir, "val", "raise --val-fraction")


def _check_split(dataset_dir: str | Path, split: str, fix: str) -> None:
    splits = read_manifest(dataset_dir)["splits"]
    if split not in splits or not splits[split]["shards"]:
        raise DataError(
            f"the {split!r} split of {dataset_dir} has no shard ({splits.get(split, {}).get('documents', 0)} "
            f"documents): re-run tools/prepare_data.py ({fix}), or set data.dir to another dataset"
        )


def check_readers(sources: list, world_size: int, num_workers: int) -> None:
    """Raise DataError naming the dataset and the fix if a source's train split has fewer sequences
    than the run has readers (ranks x data-loader workers): the loader splits each epoch's rows
    evenly over the readers, each needs at least one, and it would refuse only once the model is
    built. Any number of shards is fine (a reader may read pieces of shards)."""
    workers = max(1, num_workers)
    readers = world_size * workers
    for source in sources:
        sequences = int(source.manifest["splits"]["train"]["sequences"])
        if sequences < readers:
            raise DataError(
                f"the 'train' split of {source.dir} has {counted(sequences, 'sequence')} but {counted(world_size, 'rank')} "
                f"x {workers} data.num_workers = {readers} readers need at least one each: lower data.num_workers, train on "
                "fewer ranks, or add text"
            )


def shard_problems(sources: list) -> list[str]:
    """What is wrong with each shard file (every split) that the sources' manifests list, one line
    per bad shard: missing, or of another size than it was written with (the manifest's `bytes`;
    a manifest written before that was recorded: smaller than its rows' tokens, or not a whole
    number of tar records). A stat per shard, nothing read: a shard cut short or replaced since
    the preparation is found here, not when the loader reaches it, maybe hours into the run. A
    shard replaced by one of the same size is found by the loader, by its sha256."""
    problems = []
    for source in sources:
        manifest, root = source.manifest, str(source.dir)
        row_bytes = (int(manifest["seq_len"]) + 1) * np.dtype(manifest["token_dtype"]).itemsize + 16  # tokens, meta
        for split in manifest["splits"].values():
            for shard in split["shards"]:
                problem = _shard_problem(os.path.join(root, shard["path"]), shard, row_bytes)
                if problem:
                    problems.append(problem)
    return problems


def _shard_problem(path: str, shard: dict, row_bytes: int) -> str | None:
    try:
        size = os.stat(path).st_size  # os, not pathlib: 12 us a shard, not 54 (tools/bench_shard_check.py)
    except FileNotFoundError:
        return f"{path} is missing"
    except OSError as err:
        return f"{path} cannot be examined ({err.strerror})"
    if "bytes" in shard:
        if size != shard["bytes"]:
            return f"{path} holds {size} bytes, not the {shard['bytes']} it was written with"
        return None
    least = int(shard["sequences"]) * row_bytes
    if size < least:
        return f"{path} holds {size} bytes, fewer than its {shard['sequences']} sequences take ({least})"
    if size % tarfile.RECORDSIZE:
        return f"{path} holds {size} bytes, not a whole number of {tarfile.RECORDSIZE}-byte tar records"
    return None


def describe_shard_problems(problems: list[str]) -> str:
    """A message naming the bad shards (the first three) and the fix."""
    named = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return (
        f"{len(problems)} shard file(s) that the dataset's manifest.json lists are missing or changed since it was "
        f"prepared: {named}. The dataset was changed after it was prepared (a scratch filesystem's purge, a copy cut "
        "short or redone): copy them back from where it was prepared or re-create it with tools/prepare_data.py; "
        "data.on_corrupt=skip trains without them"
    )
