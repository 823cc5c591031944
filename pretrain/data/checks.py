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
    """Raise DataError naming the dataset and the fix if a source's train split has fewer shards
    than the run has readers (ranks x data-loader workers): the loader gives each reader whole
    shards and would refuse it only once the model is built."""
    workers = max(1, num_workers)
    readers = world_size * workers
    for source in sources:
        train = source.manifest["splits"]["train"]
        shards, sequences = len(train["shards"]), int(train["sequences"])
        if shards >= readers:
            continue
        fix = (
            f"re-run tools/prepare_data.py with --sequences-per-shard {sequences // readers} or less"
            if sequences >= readers
            else f"it holds only {sequences} sequences: train it on fewer ranks, or add text"
        )
        raise DataError(
            f"the 'train' split of {source.dir} has {shards} shard(s) but {world_size} ranks x {workers} "
            f"data.num_workers = {readers} readers need at least one each: lower data.num_workers, or {fix}"
        )


def uneven_readers(sources: list, world_size: int, num_workers: int, seed: int) -> list[str]:
    """Log lines for each source whose train shards do not go evenly round the run's readers
    (ranks x data-loader workers). Every reader takes whole shards and all read at one pace, so a
    reader with fewer rows starts its next epoch while others are still in theirs: over one pass's
    worth of steps, about as many rows are read twice as are not read at all. The count is that of
    epoch 0's split (`pretrain.data.loader`), the rows each reader lacks of an equal share."""
    from pretrain.data.loader import _scheme

    workers = max(1, num_workers)
    readers = world_size * workers
    lines = []
    for source in sources:
        rows = [int(s["sequences"]) for s in source.manifest["splits"]["train"]["shards"]]
        if not len(rows) % readers or len(rows) < readers:  # as many shards each; or too few (check_readers)
            continue
        per_reader = [sum(rows[k] for k in _scheme(seed, 0, len(rows), c, readers)) for c in range(readers)]
        share = sum(rows) / readers
        twice = round(sum(max(0.0, share - r) for r in per_reader))
        if twice * 100 < sum(rows):  # under 1%
            continue
        counts = sorted((len(_scheme(seed, 0, len(rows), c, readers)) for c in range(readers)), reverse=True)
        lines.append(
            f"data: {source.name}: {len(rows)} shards over {readers} readers ({world_size} ranks x {workers} "
            f"data.num_workers; {'/'.join(map(str, counts)) if readers <= 8 else f'{counts[-1]} to {counts[0]}'} "
            f"shards each), read at one pace: over one pass's worth of steps about {twice} of its "
            f"{sum(rows)} rows ({100 * twice / sum(rows):.0f}%) are read twice and as many not at all; a shard "
            "count that is a multiple of the readers, or many shards per reader (--sequences-per-shard), "
            "keeps them level"
        )
    return lines
