"""Checkpoints: DeepSpeed engine state + value shards + per-rank train state, atomically.

Layout under `<run_dir>/checkpoints/`:
  step_00000100/                 one complete checkpoint (a DeepSpeed tag)
    <DeepSpeed files>            dense params, ZeRO shards, optimizer, LR scheduler, client state
    values.t<table>.s<shard>-of-<P>.safetensors
                                 memory value shards + their optimizer state (pretrain.parallel)
    rank_00000.pt                per-rank state: data loader position, RNG states, slot counters
    slot_frequencies.safetensors the reduced slot-frequency table (pretrain.slots)
    config.yaml                  the resolved run config
    checksums.json               size and CRC-32 of every file above (pretrain.checksums), written last
  latest                         the tag of the newest complete checkpoint
  zero_to_fp32.py, zero_to_torch.py
                                 DeepSpeed's recovery scripts (ZeRO 1-3), replaced whole at each save

A checkpoint is written under `.tmp-<tag>` and renamed to `<tag>` only when every rank
has finished; `latest` is replaced last. A crash mid-write leaves the previous
checkpoint and `latest` untouched; stale temporary folders are removed at the next save. A
write that fails on one rank (its disk, its quota) is raised on every rank, naming that rank,
and its unfinished folder is deleted at once (on a full disk, the room it held).
Per-rank files hold tensors and plain Python values only, loaded with weights_only=True.

Resume trusts no file of a checkpoint: before anything is loaded, `verify` checks that every
file the resume will read is present, whole and readable (the export's checks plus the
per-rank files), `Checkpointer.verify` that no file differs from the size and CRC-32 it was
written with, and DeepSpeed's own loads run under torch's weights-only unpickler, so a
pickle payload planted in a checkpoint is refused, never executed. A damaged newest
checkpoint is refused with a message naming the file and the newest checkpoint that passes
the same checks (no silent fallback: the user decides; see docs/faults.md, "Resuming").

A checkpoint written by another number of ranks is re-partitioned on load (pretrain.resharding):
the dense state through DeepSpeed's universal checkpoint, the per-rank items by their
`load_resharded` from all old ranks' files.

One concern per module: `layout.py` (folder names, `latest`, pruning, CheckpointError),
`checkpointer.py` (Checkpointer: save, verify, load), `verification.py` (every file a resume reads,
checked before it loads), `compatibility.py` (what a resume may not change: model, ZeRO stage,
precision). This package's namespace re-exports their public names, the import path callers use; they are
imported on first use, so that the folder checks of layout.py (which memlayers-export refuses a missing run
with) load no torch.
"""

from __future__ import annotations

from pretrain.lazy_names import lazy_names

# name -> the module of this package that defines it
_MODULE_OF = {
    "Checkpointer": "checkpointer",
    "ZERO_STAGES_INTERCHANGEABLE": "compatibility",
    "check_compatible": "compatibility",
    "check_dtype_change": "compatibility",
    "check_value_optimizer_change": "compatibility",
    "check_zero_stage_change": "compatibility",
    "model_fingerprint": "compatibility",
    "TMP_PREFIX": "layout",
    "CheckpointError": "layout",
    "checkpoint_folders": "layout",
    "latest_checkpoint": "layout",
    "prune_checkpoints": "layout",
    "rank_file": "layout",
    "step_of": "layout",
    "tag_for": "layout",
    "verify": "verification",
}

__all__ = sorted(_MODULE_OF)
__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
