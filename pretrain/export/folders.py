"""Which folder is which, checked without torch: an export (its files), a training run or checkpoint
given where an export belongs, the checkpoint a run directory designates. The export tools refuse a
missing or wrong folder with these before they import torch (seconds)."""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint import CheckpointError, checkpoint_folders, latest_checkpoint, step_of
from pretrain.export.errors import ExportError

EXPORT_FILES = ("config.json", "model.safetensors")  # what loading an export reads


def refuse_training_run(folder: Path) -> None:
    """An ExportError where `folder` is a run directory or a checkpoint (what a tool given one
    instead of an export meets first), naming the export command; nothing otherwise."""
    if (folder / "checkpoints").is_dir() or (folder / "config.yaml").is_file():
        raise ExportError(
            f"{folder} is a training run or checkpoint, not an export: export it first, "
            f"memlayers-export {folder} OUT (tools/export.py), and pass OUT"
        )


def check_export_dir(export_dir: str | Path, needed: tuple[str, ...] = EXPORT_FILES) -> Path:
    """The export folder, or an ExportError naming what is wrong: no such folder, a training run in its
    place (with the export command), or a missing file of `needed`."""
    folder = Path(export_dir)
    if not folder.is_dir():
        raise ExportError(f"no such export directory: {folder} (memlayers-export writes one from a run)")
    for name in needed:
        if not (folder / name).is_file():
            refuse_training_run(folder)
            raise ExportError(f"{folder} has no {name}: is it an export directory (written by memlayers-export)?")
    return folder


def export_tokenizer_path(export_dir: str | Path) -> Path:
    """The export's tokenizer.model, or an error saying how to get one (checked before any model loads)."""
    path = check_export_dir(export_dir, needed=()) / "tokenizer.model"
    if not path.is_file():
        refuse_training_run(path.parent)
        raise ExportError(
            f"{export_dir} has no tokenizer.model, which generation and evaluation need: re-export "
            "with tools/export.py (it copies the run's tokenizer), or copy the tokenizer.model the "
            "model was trained with into the folder"
        )
    return path


def resolve_checkpoint_dir(source: str | Path) -> Path:
    """The checkpoint folder a run directory, checkpoints root or checkpoint folder designates."""
    path = Path(source)
    if not path.exists():
        kept = checkpoint_folders(path.parent) if step_of(path) is not None else []
        if kept:  # a step the run pruned (it keeps its last train.keep_checkpoints) or never wrote
            raise ExportError(
                f"no such checkpoint: {path}; {path.parent} holds {', '.join(p.name for p in kept)} "
                "(a run keeps its last train.keep_checkpoints): pass one of those"
            )
        raise ExportError(f"no such run directory or checkpoint: {path}")
    if not path.is_dir():
        raise ExportError(
            f"{path} is a file: pass a run directory (holding checkpoints/latest) or a checkpoint "
            "folder (checkpoints/step_XXXXXXXX)"
        )
    for root in (path / "checkpoints", path):
        try:
            newest = latest_checkpoint(root)
        except CheckpointError as err:
            raise ExportError(str(err)) from err
        if newest is not None:
            return newest
    if (path / "config.yaml").is_file() or any(path.glob("*model_states.pt")):
        return path
    raise ExportError(
        f"{path} is neither a run directory (with checkpoints/latest) nor a checkpoint folder "
        "(with config.yaml and DeepSpeed model states): pass e.g. runs/tiny or "
        "runs/tiny/checkpoints/step_00000100"
    )
