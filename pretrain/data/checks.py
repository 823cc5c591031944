"""Checks of a prepared dataset that the trainer runs at start-up, before any heavy work:
what the loader would otherwise only find out at the first evaluation, hours later."""

from __future__ import annotations

from pathlib import Path

from pretrain.data.errors import DataError
from pretrain.data.shards import read_manifest


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
                f"the 'train' split of {source.dir} has {sequences} sequences but {world_size} ranks x {workers} "
                f"data.num_workers = {readers} readers need at least one each: lower data.num_workers, train on "
                "fewer ranks, or add text"
            )


def missing_shards(sources: list) -> list[Path]:
    """The shard files (every split) that the sources' manifests list and that are not on disk."""
    return [
        Path(source.dir) / shard["path"]
        for source in sources
        for split in source.manifest["splits"].values()
        for shard in split["shards"]
        if not (Path(source.dir) / shard["path"]).is_file()
    ]


def describe_missing(missing: list[Path]) -> str:
    """A message naming the missing shards (the first three) and the fix."""
    named = ", ".join(str(p) for p in missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return (
        f"{len(missing)} shard file(s) that the dataset's manifest.json lists are missing: {named}. The dataset was "
        "changed after it was prepared (a scratch filesystem's purge, a copy cut short): copy them back from where it "
        "was prepared or re-create it with tools/prepare_data.py; data.on_corrupt=skip trains without them"
    )
