"""Where a slot-frequency table is: its file name, and the newest one in a checkpoint or export folder.
Torch-free, so that memlayers-slot-report refuses a missing table before it imports torch (seconds)."""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint import CheckpointError, latest_checkpoint

TABLE_FILENAME = "slot_frequencies.safetensors"


def find_table(path: str | Path) -> Path:
    """A table file, or the table inside a checkpoint/export directory (newest if several)."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        try:
            newest = latest_checkpoint(path)
        except (FileNotFoundError, CheckpointError):  # a dangling `latest`: the newest table found
            newest = None
        if newest is not None and (newest / TABLE_FILENAME).is_file():
            return newest / TABLE_FILENAME
        found = sorted(path.rglob(TABLE_FILENAME), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1]
        raise FileNotFoundError(
            f"no {TABLE_FILENAME} under directory {path} (pass the table file or a "
            f"checkpoint/export directory that holds one)"
        )
    raise FileNotFoundError(f"slot table path {path} does not exist")
