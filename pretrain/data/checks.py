"""Checks of a prepared dataset that the trainer runs at start-up, before any heavy work:
what the loader would otherwise only find out at the first evaluation, hours later."""
from __future__ import annotations

from pathlib import Path

from pretrain.data.errors import DataError
from pretrain.data.shards import read_manifest


def check_trainable(dataset_dir: str | Path) -> None:
    """Raise DataError naming the dataset and the fix if the trainer cannot use it: an empty
    train split, or an empty validation split (the trainer evaluates on it)."""
    manifest = read_manifest(dataset_dir)
    splits = manifest["splits"]
    for split, fix in (("train", "check --input"), ("val", "raise --val-fraction")):
        if split not in splits or not splits[split]["shards"]:
            raise DataError(
                f"the {split!r} split of {dataset_dir} has no shard ({splits.get(split, {}).get('documents', 0)} "
                f"documents): re-run tools/prepare_data.py ({fix}), or set data.dir to another dataset"
            )
