"""Checkpoints: DeepSpeed engine state + value shards + per-rank train state, atomically.

Layout under `<run_dir>/checkpoints/`:
  step_00000100/                 one complete checkpoint (a DeepSpeed tag)
    <DeepSpeed files>            dense params, ZeRO shards, optimizer, LR scheduler, client state
    values_*.safetensors         memory value shards + their optimizer state (pretrain.parallel)
    rank_00000.pt                per-rank state: data loader position, RNG states, slot counters
    slot_frequencies.safetensors the reduced slot-frequency table (pretrain.slots)
    config.yaml                  the resolved run config
  latest                         the tag of the newest complete checkpoint

A checkpoint is written under `.tmp-<tag>` and renamed to `<tag>` only when every rank
has finished; `latest` is replaced last. A crash mid-write leaves the previous
checkpoint and `latest` untouched; stale temporary folders are removed at the next save.
Per-rank files hold tensors and plain Python values only, loaded with weights_only=True.

Resume trusts no file of a checkpoint: before anything is loaded, `verify` checks that every
file the resume will read is present, whole and readable (the export's checks plus the
per-rank files), and DeepSpeed's own loads run under torch's weights-only unpickler, so a
pickle payload planted in a checkpoint is refused, never executed. A damaged newest
checkpoint is refused with a message naming the file and the newest checkpoint that passes
the same checks (no silent fallback: the user decides; see the README's "Resuming").
"""

from __future__ import annotations

import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from pretrain.config import ConfigError, RunConfig, config_to_dict, save_config
from pretrain.distributed import barrier
from pretrain.files import atomic_write, atomic_write_text, replace_with

TMP_PREFIX = ".tmp-"
_TAG = re.compile(r"^[A-Za-z0-9_.-]+$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from (missing, truncated, unreadable or unsafe file); the
    message names the file and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(ckpt_dir: Path, rank: int) -> Path:
    return ckpt_dir / f"rank_{rank:05d}.pt"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under `root`, or None."""
    root = Path(root)
    latest = root / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag:
        raise CheckpointError(
            f"{latest} is empty (it should name a checkpoint folder such as {tag_for(100)}): "
            f"write the newest complete folder's name into it, or delete it to start afresh"
        )
    if not _TAG.match(tag) or tag in (".", ".."):
        raise CheckpointError(f"{latest} names {tag!r}, which is not a checkpoint folder name under {root}")
    path = root / tag
    if not path.is_dir():
        raise CheckpointError(f"{latest} names checkpoint {tag!r} but {path} is missing")
    return path


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGState:
    """The process's RNG states as a checkpoint item (`rng_state` / `set_rng_state`)."""

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def model_fingerprint(cfg: RunConfig) -> dict:
    """The parts of the config a checkpoint's tensors depend on."""
    return config_to_dict(cfg.model)


def check_compatible(saved: dict, cfg: RunConfig, ckpt_dir: Path) -> None:
    """Refuse a checkpoint whose model config differs (the tensors would not fit)."""
    current = model_fingerprint(cfg)
    if saved == current:
        return
    diffs = _diff(saved, current, "model")
    raise ConfigError(
        f"checkpoint {ckpt_dir} was written for a different model config ({'; '.join(diffs[:5])}); "
        f"use the original config, or a new train.run_dir to start afresh"
    )


def _diff(a, b, prefix: str) -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}")
        return out
    if a != b:
        # memory.parallel_size may change: value shards are re-sharded on load
        if prefix.endswith("memory.parallel_size"):
            return []
        return [f"{prefix}: checkpoint {a!r} vs config {b!r}"]
    return []


class Checkpointer:
    """Saves and restores complete training checkpoints under `<run_dir>/checkpoints`."""

    def __init__(self, run_dir: str | Path, rank: int, keep: int):
        self.root = Path(run_dir) / "checkpoints"
        self.rank, self.keep = rank, keep
        self.saved_step: int | None = None  # the step of this process's last complete save
        self.engine = self.memory_parallel = self.train_state = self.rank_state = None
        self.writers: list = []

    def track(self, engine, memory_parallel, train_state, rank_state, writers=()) -> None:
        """Declare what every checkpoint holds: the DeepSpeed engine, the value shards, the run's
        `train_state` (saved as DeepSpeed's client state), this rank's `rank_state` (one file per
        rank) and `writers`, objects whose `write(folder)` adds files of their own (a collective:
        every rank calls it, between the save's barriers)."""
        self.engine, self.memory_parallel = engine, memory_parallel
        self.train_state, self.rank_state, self.writers = train_state, rank_state, list(writers)

    def save(self, step: int, cfg: RunConfig) -> Path:
        """Write a checkpoint of the tracked items for `step` on every rank; return its final folder."""
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir, final_dir = self.root / tmp_tag, self.root / tag
        if self.rank == 0:
            self._remove_stale_temporaries()
            self.root.mkdir(parents=True, exist_ok=True)
        barrier()
        client_state = dict(self.train_state.state_dict(), model_config=model_fingerprint(cfg))
        self.engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state=client_state, save_latest=False)
        self.memory_parallel.save(tmp_dir)
        _atomic_torch_save(self.rank_state.state_dict(), rank_file(tmp_dir, self.rank))
        if self.rank == 0:
            save_config(cfg, tmp_dir / "config.yaml")
        for writer in self.writers:
            writer.write(tmp_dir)
        barrier()
        if self.rank == 0:
            replace_with(tmp_dir, final_dir)
            atomic_write_text(self.root / "latest", tag)
            self._prune()
        barrier()
        self.saved_step = step
        return final_dir

    def verify(self, ckpt_dir: Path, cfg: RunConfig, world_size: int, dataset_dir: Path | None = None) -> None:
        """Refuse a checkpoint that a resume with `world_size` ranks could not read whole
        (CheckpointError naming the file and the newest complete checkpoint) or whose model
        config differs (ConfigError). Loads nothing into the model."""
        try:
            verify(ckpt_dir, world_size, dataset_dir, self.rank)
        except CheckpointError as err:
            raise CheckpointError(_refusal(ckpt_dir, str(err), world_size, dataset_dir)) from None
        saved_config = ckpt_dir / "config.yaml"
        check_compatible(OmegaConf.to_container(OmegaConf.load(saved_config))["model"], cfg, ckpt_dir)

    def load(self, ckpt_dir: Path) -> None:
        """Restore every tracked item from `ckpt_dir`.

        Call `verify` first. Every file is read with the weights-only unpickler, DeepSpeed's too."""
        rank_state = torch.load(rank_file(ckpt_dir, self.rank), map_location="cpu", weights_only=True)
        from pretrain.export.dense import weights_only_loads

        with weights_only_loads():  # DeepSpeed's own torch.load passes weights_only=False
            _, client_state = self.engine.load_checkpoint(
                str(ckpt_dir.parent), tag=ckpt_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if client_state is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint in {ckpt_dir} (missing files?)")
        self.memory_parallel.load(ckpt_dir)
        self.train_state.load_state_dict(client_state)
        self.rank_state.load_state_dict(rank_state)

    def _remove_stale_temporaries(self) -> None:
        if self.root.is_dir():
            for stale in self.root.glob(TMP_PREFIX + "*"):
                shutil.rmtree(stale, ignore_errors=True)

    def _prune(self) -> None:
        tags = sorted(p for p in self.root.glob("step_*") if p.is_dir())
        for old in tags[: max(0, len(tags) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)


def verify(ckpt_dir: Path, world_size: int, dataset_dir: Path | None = None, rank: int | None = None) -> None:
    """Check every file a resume with `world_size` ranks reads: present, whole, readable with
    the weights-only unpickler (`rank`'s own per-rank file is read in full, the others' are
    checked for completeness). Raises CheckpointError naming the first bad file."""
    from pretrain.export.errors import ExportError
    from pretrain.export.source import check_torch_zip, inspect

    try:
        inspect(ckpt_dir, dataset_dir)  # config, DeepSpeed files (model states read weights-only), value shards, table
        for other in range(world_size):
            check_torch_zip(rank_file(ckpt_dir, other))
        if rank is not None:
            torch.load(rank_file(ckpt_dir, rank), map_location="cpu", weights_only=True)
    except ExportError as err:
        raise CheckpointError(str(err)) from None
    except (pickle.UnpicklingError, RuntimeError) as err:
        raise CheckpointError(
            f"{rank_file(ckpt_dir, rank)} cannot be read as tensors and plain values "
            f"(refused, nothing in it executed): {err}"
        ) from None


def _refusal(ckpt_dir: Path, problem: str, world_size: int, dataset_dir: Path | None) -> str:
    """The message for a damaged checkpoint: the file, and the newest earlier checkpoint that passes."""
    older = sorted((p for p in ckpt_dir.parent.glob("step_*") if p.is_dir() and p.name < ckpt_dir.name), reverse=True)
    usable = None
    for candidate in older:
        try:
            verify(candidate, world_size, dataset_dir)
            usable = candidate
            break
        except CheckpointError:
            continue
    if usable is not None:
        fix = (
            f"to resume from the previous complete checkpoint, move {ckpt_dir} aside and write "
            f"'{usable.name}' into {ckpt_dir.parent / 'latest'}"
        )
    else:
        fix = f"no earlier complete checkpoint exists: restore {ckpt_dir} from a copy, or use a new train.run_dir"
    return f"cannot resume from checkpoint {ckpt_dir}: {problem}. Nothing was loaded or changed; {fix}"


def _atomic_torch_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
