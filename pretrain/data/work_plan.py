"""Which rows each reader (rank x worker) of a ShardLoader reads in an epoch, as pieces [shard,
first row, end row]: the epoch's shard order, its rows cut into contiguous, equal parts (the row
split) or whole shards per reader (the scheme of states of versions 1 and 2), or a plan's explicit
list after a reshard. pretrain/data/loader.py's docstring describes the scheme."""

from __future__ import annotations

import numpy as np

ROWS, SHARDS = "rows", "shards"  # a state's work split: rows (version 3 on), whole shards (versions 1 and 2)


def epoch_order(seed: int, epoch: int, n_shards: int) -> list[int]:
    """The shard order of `epoch`: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n_shards).tolist()


def part_of(pieces: list[list[int]], part: int, parts: int) -> list[list[int]]:
    """Part `part` of `parts` contiguous, equal parts of the rows of `pieces` ([shard, first row,
    end row], in order): their rows [part * n // parts, (part + 1) * n // parts), as pieces."""
    n = sum(end - first for _, first, end in pieces)
    lo, hi, at, out = part * n // parts, (part + 1) * n // parts, 0, []
    for shard, first, end in pieces:
        a, b = max(lo - at, 0), min(hi - at, end - first)
        if a < b:
            out.append([shard, first + a, first + b])
        at += end - first
    return out


def head_of(pieces: list[list[int]], n: int) -> list[list[int]]:
    """The first `n` rows of `pieces` ([shard, first row, end row], in order), as pieces."""
    out = []
    for shard, first, end in pieces:
        if n <= 0:
            break
        out.append([shard, first, first + min(end - first, n)])
        n -= end - first
    return out


def row_count(pieces: list[list[int]]) -> int:
    return sum(end - first for _, first, end in pieces)


def work_of(
    scheme: str, settings: dict, plan: dict | None, sizes: list[int], worker: int, epoch: int
) -> list[list[int]]:
    """[shard index, first row, end row] of each piece a rank's `worker` reads in `epoch`: the
    plan's list for the epoch a reshard left, else the scheme's (see pretrain/data/loader.py's docstring)."""
    if plan is not None and plan["epoch"] == epoch:
        return plan["work"][worker]
    consumer, consumers = settings["rank"] * settings["workers"] + worker, settings["world_size"] * settings["workers"]
    order = epoch_order(settings["seed"], epoch, len(sizes))
    if scheme == SHARDS:
        return [[k, 0, sizes[k]] for k in order[consumer::consumers]]
    return part_of([[k, 0, sizes[k]] for k in order], (consumer + epoch) % consumers, consumers)
