"""Where checkpoints live under `<run_dir>/checkpoints/` and what they are named: a folder per
step (`tag_for`), one file per rank, `latest` naming the newest complete one (refused when it is
missing, empty or names no folder), the `.tmp-` prefix of unfinished ones, and pruning all but
the newest few. CheckpointError, the error of every checkpoint module, is defined here."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

TMP_PREFIX = ".tmp-"
_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from (missing, truncated, unreadable or unsafe file) or
    could not be written (a full disk); the message names the file and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(ckpt_dir: Path) -> int | None:
    """The step a checkpoint folder named by `tag_for` was saved at; None for another name."""
    match = re.fullmatch(r"step_(\d+)", Path(ckpt_dir).name)
    return int(match.group(1)) if match else None


def rank_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"rank_{rank:05d}.pt"


def checkpoint_folders(root: str | Path) -> list[Path]:
    """The checkpoint folders (named by `tag_for`) under `root`, oldest step first."""
    steps = {p: step_of(p) for p in Path(root).glob("step_*") if p.is_dir()}
    return sorted((p for p, s in steps.items() if s is not None), key=steps.get)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `root` (the one `latest` names), or None
    where `root` holds no checkpoint. A `latest` that is missing while checkpoint folders are
    there, empty, or naming no folder is refused (CheckpointError): a run would otherwise
    start afresh beside, and later overwrite, checkpoints it was meant to resume from."""
    root = Path(root)
    latest = root / "latest"
    folders = checkpoint_folders(root)
    newest = f"(the newest folder here is {folders[-1].name})" if folders else "(there is none here)"
    afresh = f"to start afresh, move {root} aside or use a new train.run_dir"
    if not latest.is_file():
        if not folders:
            return None
        raise CheckpointError(
            f"{root} holds checkpoints ({', '.join(p.name for p in folders[-3:])}) but no 'latest' file naming the "
            f"one to resume from (a run stopped between renaming its first checkpoint and writing latest, or "
            f"latest was deleted): write the folder's name into {latest} {newest}; {afresh}"
        )
    tag = latest.read_text().strip()
    if not tag:
        raise CheckpointError(
            f"{latest} is empty (it should name a checkpoint folder such as {tag_for(100)}): "
            f"write the newest complete folder's name into it {newest}; {afresh}"
        )
    if not _TAG.match(tag) or tag in (".", ".."):
        raise CheckpointError(f"{latest} names {tag!r}, which is not a checkpoint folder name under {root}")
    path = root / tag
    if not path.is_dir():
        raise CheckpointError(
            f"{latest} names checkpoint {tag!r} but {path} is missing: write the name of a complete checkpoint "
            f"folder into {latest} {newest}; {afresh}"
        )
    return path


def prune_checkpoints(root: Path, keep: int, saved: str) -> list[Path]:
    """Delete all but the `keep` newest checkpoints up to `saved` (the tag just written, which
    is always kept); return what was deleted. Checkpoints of later steps than `saved` are left
    alone: they belong to a run that was rolled back (`latest` set to an earlier checkpoint),
    and each is replaced when this run saves that step again. Only folders named by `tag_for`
    count: one moved aside beside them (`step_00000010.damaged`) is neither a checkpoint kept
    nor one to delete. Ordered by step number (a 9-digit step sorts after an 8-digit one).

    Each is renamed to `.tmp-pruned-<tag>` before it is deleted: a deletion cut short (a kill)
    leaves a temporary, removed at the next save, never a half-deleted `step_*` folder, which
    looked like a checkpoint (one without checksums.json is resumed from unchecked)."""
    last = step_of(Path(saved))
    timeline = [p for p in checkpoint_folders(root) if step_of(p) <= last]
    old = timeline[: max(0, len(timeline) - max(1, keep))]
    for folder in old:
        doomed = folder.with_name(f"{TMP_PREFIX}pruned-{folder.name}")
        try:
            os.replace(folder, doomed)
        except OSError:
            doomed = folder  # removed in place, as far as it goes
        shutil.rmtree(doomed, ignore_errors=True)
    return old
