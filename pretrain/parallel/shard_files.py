"""Value-shard checkpoint files: write, read with re-sharding, consolidate.

One safetensors file per (table, shard) holds the shard's columns and their AdamW
state: `values.t{table}.s{shard}-of-{P}.safetensors` with tensors weight, exp_avg,
exp_avg_sq (N, v_dim / P) and step (1,), and metadata naming the table width, seed
and column range. The row-wise optimizer (sparse_rowwise_adamw) writes exp_avg_sq_row
(N,) instead of exp_avg_sq: one second moment per full row, the same in every shard.
Files are streamed (no copy of the shard) to a temporary name and renamed. Reading a
column range [c0, c1) streams the overlapping columns of whichever shards hold them, so
a checkpoint saved with P shards loads into any P' that divides v_dim. `consolidate`
assembles whole tables in memory.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open

from pretrain.export.safetensors_io import StreamWriter
from pretrain.model.names import value_table_name

FILE_RE = re.compile(r"^values\.t(\d+)\.s(\d+)-of-(\d+)\.safetensors$")
ROW_TENSORS = ("exp_avg_sq_row",)  # (N,): one entry per row, identical in every column shard
FORMAT = "memlayers-value-shard-1"
ZERO_ROW_BLOCK = 1 << 20  # rows of zeros written at a time for missing moments


class ShardFileError(RuntimeError):
    """A value-shard checkpoint file is missing, truncated or inconsistent."""


def shard_file_name(table: int, shard: int, parallel_size: int) -> str:
    return f"values.t{table}.s{shard}-of-{parallel_size}.safetensors"


def write_shard(
    path: Path,
    weight: torch.Tensor,
    moments: dict[str, torch.Tensor | None],
    step: float,
    meta: dict,
) -> None:
    """Stream one shard file: each tensor is written from its own memory (a CPU shard is
    not copied; safetensors' save_file would first copy all of them into bytes, twice
    the shard). `moments` maps exp_avg, exp_avg_sq or exp_avg_sq_row to the optimizer's
    tensor; missing ones (no step taken yet) are written as zeros, row block by row block."""
    tensors = {"weight": weight, **moments}

    def shape(name):
        return tuple(weight.shape[:1]) if name in ROW_TENSORS else tuple(weight.shape)

    specs = [(name, shape(name), weight.dtype if t is None else t.dtype) for name, t in tensors.items()]
    specs.append(("step", (1,), torch.float32))
    metadata = {"format": FORMAT, **{k: str(v) for k, v in meta.items()}}
    with StreamWriter(path, specs, metadata) as writer:
        for name, tensor in tensors.items():
            if tensor is not None:
                writer.write(tensor.detach())
                continue
            for r0 in range(0, weight.shape[0], ZERO_ROW_BLOCK):
                rows = min(ZERO_ROW_BLOCK, weight.shape[0] - r0)
                writer.write(torch.zeros(rows, *shape(name)[1:], dtype=weight.dtype))
        writer.write(torch.tensor([float(step)], dtype=torch.float32))


def saved_parallel_size(checkpoint_dir: Path, num_tables: int) -> int:
    """The P the checkpoint's value shards were saved with; checks every file is present."""
    found: dict[int, set[tuple[int, int]]] = {}
    for entry in Path(checkpoint_dir).iterdir() if Path(checkpoint_dir).is_dir() else []:
        m = FILE_RE.match(entry.name)
        if m:
            t, s, p = map(int, m.groups())
            found.setdefault(p, set()).add((t, s))
    if not found:
        raise ShardFileError(
            f"no value-shard files (values.t<table>.s<shard>-of-<P>.safetensors) in {checkpoint_dir}: "
            "was this checkpoint saved with MemoryParallel.save?"
        )
    if len(found) > 1:
        raise ShardFileError(
            f"{checkpoint_dir} mixes value shards saved with different group sizes {sorted(found)}: "
            "remove the stale files"
        )
    ((P, have),) = found.items()
    for t in range(num_tables):
        for s in range(P):
            if (t, s) not in have:
                raise ShardFileError(f"missing value-shard file {Path(checkpoint_dir) / shard_file_name(t, s, P)}")
    return P


def read_columns(
    checkpoint_dir: Path, table: int, saved_p: int, col_start: int, col_end: int, name: str
) -> tuple[torch.Tensor, float, dict]:
    """Columns [col_start, col_end) of one table's tensor `name` (weight, exp_avg, exp_avg_sq), the
    AdamW step and the metadata of the last shard file read. One tensor per call, so that a caller
    holds at most one shard-sized copy at a time."""
    parts: list[torch.Tensor] = []
    steps, meta = set(), {}
    for s in range(saved_p):
        path = Path(checkpoint_dir) / shard_file_name(table, s, saved_p)
        with _open_shard(path) as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ShardFileError(f"{path} is not a value-shard file (format {meta.get('format')!r})")
            s0, s1 = int(meta["col_start"]), int(meta["col_end"])
            lo, hi = max(s0, col_start), min(s1, col_end)
            if lo >= hi:
                continue
            _require_tensor(f, path, name)
            parts.append(f.get_slice(name)[:, lo - s0 : hi - s0])
            steps.add(float(f.get_tensor("step")[0]))
    if len(steps) > 1:
        raise ShardFileError(f"value shards of table {table} in {checkpoint_dir} disagree on the AdamW step {steps}")
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # one part: no copy
    if out.shape[1] != col_end - col_start:
        raise ShardFileError(
            f"value shards of table {table} in {checkpoint_dir} cover {out.shape[1]} of columns "
            f"[{col_start}, {col_end}) for {name}"
        )
    return out, steps.pop() if steps else 0.0, meta


@contextmanager
def _open_shard(path: Path) -> Iterator:
    """safe_open(path), any failure to read it (missing, truncated: safetensors reports truncation
    as assorted errors) raised as a ShardFileError naming the file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            yield f
    except ShardFileError:
        raise
    except Exception as err:
        raise ShardFileError(f"cannot read value-shard file {path} (missing or truncated?): {err}") from err


def _require_tensor(f, path: Path, name: str) -> None:
    if name not in f.keys():
        kind = "a row-wise" if ROW_TENSORS[0] in f.keys() else "an element-wise"
        raise ShardFileError(
            f"{path} has no {name}: it holds {kind} second moment, saved with another optim.value_optimizer "
            "(adamw and sparse_adamw are element-wise, sparse_rowwise_adamw row-wise): resume with the "
            "optimizer that saved it"
        )


def read_rows(checkpoint_dir: Path, table: int, saved_p: int, name: str) -> torch.Tensor:
    """A per-row tensor (N,) of one table; every column shard holds the same one, shard 0 is read."""
    path = Path(checkpoint_dir) / shard_file_name(table, 0, saved_p)
    with _open_shard(path) as f:
        _require_tensor(f, path, name)
        return f.get_tensor(name)


def consolidate(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every full value table of a checkpoint in memory, {"values.{i}.weight": (N, v_dim)}, filled
    shard by shard: to inspect or compare checkpoints (the export streams the shard files itself,
    pretrain/export/source.py, without a whole table in memory)."""
    checkpoint_dir = Path(checkpoint_dir)
    names = [FILE_RE.match(e.name) for e in checkpoint_dir.iterdir()] if checkpoint_dir.is_dir() else []
    num_tables = 1 + max((int(m.group(1)) for m in names if m), default=-1)
    P = saved_parallel_size(checkpoint_dir, num_tables)
    out = {}
    for t in range(num_tables):
        full = None
        for s in range(P):
            path = checkpoint_dir / shard_file_name(t, s, P)
            with _open_shard(path) as f:
                meta = f.metadata() or {}
                shard = f.get_tensor("weight")
            if full is None:
                full = torch.empty(shard.shape[0], int(meta["v_dim"]), dtype=shard.dtype)
            full[:, int(meta["col_start"]) : int(meta["col_end"])] = shard
            del shard
        out[f"{value_table_name(t)}.weight"] = full
    return out
