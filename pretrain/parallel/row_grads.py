"""Row-sparse value gradients: merge, replica reduction and norm, never an (N, v_dim) tensor.

With `optim.value_optimizer=sparse_adamw` the embedding bag's backward hands each value
shard a coalesced sparse COO gradient: the U unique rows read by one lookup and their
(U, v_dim / P) gradient rows, added up over lookups and micro-batches by `held_rows` (each
row held once). `merge` sums rows that repeat, in a fixed order, so that the result is
bitwise reproducible and identical on every rank that merges the same entries.

The data-parallel replicas of a shard read different rows, so their sum is not an
all-reduce of equal-sized tensors: `reduce_over_replicas` all-gathers every replica's
(rows, gradient rows) and merges them in replica order, which gives each replica the
same bits (the sum a dense all-reduce would give, up to fp32 addition order).
"""

from __future__ import annotations

import torch

from kernels.reference import sorted_segment_sum
from pretrain.parallel.comm import CommCounter, all_gather_rows, exchange_counts


def rows_of(grad: torch.Tensor | None, num_cols: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows ascending (U,), gradient rows (U, num_cols)) of a sparse gradient, merged; empty if None."""
    if grad is None:
        return torch.empty(0, dtype=torch.int64, device=like.device), like.new_empty(0, num_cols)
    if not grad.is_sparse:
        raise TypeError(
            "optim.value_optimizer=sparse_adamw expects row-sparse value gradients, got a dense one: the value "
            "tables must be read with value_grad='sparse' (MemoryParallel sets this up)"
        )
    rows = grad._indices()[0]
    # autograd's accumulation drops the coalesced flag of the bag's gradient: rows that are
    # strictly ascending are unique already, and merging them again would only copy them
    if grad.is_coalesced() or rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all()):
        return rows, grad._values()
    return merge(rows, grad._values())


def merge(rows: torch.Tensor, grad_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum gradient rows that share a row id, in entry order: (unique rows, summed rows)."""
    return sorted_segment_sum(rows, grad_rows)


def as_sparse(rows: torch.Tensor, grad_rows: torch.Tensor, shape) -> torch.Tensor:
    """A coalesced sparse COO gradient of `shape` holding `grad_rows` at (unique, ascending) `rows`."""
    return torch.sparse_coo_tensor(rows[None], grad_rows, tuple(shape), is_coalesced=True, check_invariants=False)


def reduce_over_replicas(rows: torch.Tensor, grad_rows: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum the row gradients of every rank in `group`; return (rows, summed rows, bytes received).

    Gathered padded to the longest replica's row count: the bytes counted are those all_gather
    moves, not the useful ones."""
    counter = CommCounter()
    counts = exchange_counts(rows.numel(), group, counter, rows.device)
    all_rows = all_gather_rows(rows, counts, group, counter)
    all_grads = all_gather_rows(grad_rows, counts, group, counter)
    merged_rows, merged_grads = merge(all_rows, all_grads)
    return merged_rows, merged_grads, counter.take()
