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
the same checks (no silent fallback: the user decides; see the README's "Resuming").

A checkpoint written by another number of ranks is re-partitioned on load (pretrain.resharding):
the dense state through DeepSpeed's universal checkpoint, the per-rank items by their
`load_resharded` from all old ranks' files.

One concern per module: `layout.py` (folder names, `latest`, pruning, CheckpointError),
`checkpointer.py` (Checkpointer: save, verify, load), `verification.py` (every file a resume reads,
checked before it loads), `compatibility.py` (what a resume may not change: model, ZeRO stage,
precision). This package's namespace re-exports their public names, the import path callers use.
"""

from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.compatibility import (
    ZERO_STAGES_INTERCHANGEABLE,
    check_compatible,
    check_dtype_change,
    check_zero_stage_change,
    model_fingerprint,
)
from pretrain.checkpoint.layout import (
    TMP_PREFIX,
    CheckpointError,
    checkpoint_folders,
    latest_checkpoint,
    prune_checkpoints,
    rank_file,
    step_of,
    tag_for,
)
from pretrain.checkpoint.verification import verify

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "TMP_PREFIX",
    "ZERO_STAGES_INTERCHANGEABLE",
    "check_compatible",
    "check_dtype_change",
    "check_zero_stage_change",
    "checkpoint_folders",
    "latest_checkpoint",
    "model_fingerprint",
    "prune_checkpoints",
    "rank_file",
    "step_of",
    "tag_for",
    "verify",
]
