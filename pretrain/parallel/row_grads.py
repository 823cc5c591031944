"""Row-sparse value gradients: merge, replica reduction and norm, never an (N, v_dim) tensor.

With `optim.value_optimizer=sparse_adamw` the embedding bag's backward hands each value
shard a coalesced sparse COO gradient: the U unique rows read by one lookup and their
(U, v_dim / P) gradient rows. Left to autograd, the gradients of several lookups (several
memory layers on a shared table, gradient-accumulation micro-batches) are added by torch's
sparse add, which on CUDA concatenates their entries (`add_out_sparse_cuda`: no merge, so
no host read of the result's size) and on the CPU merges two sorted operands: on a GPU the
held gradient grew with lookups x micro-batches, up to the table's size per lookup.

`accumulating(shard)` stands between the shard and each sparse lookup: its backward adds
that one lookup's rows into `shard.grad` at once (`add_rows`: the union of the held and new
rows, each row's held + new gradient) and hands autograd nothing, so the gradient held is
the rows read so far, each once (at most the table's N rows), whatever the lookups and
micro-batches, on every device. `merge` sums rows that repeat in entry order (the replicas'
rows, a gradient set from outside); both are bitwise reproducible and identical on every
rank that adds the same entries.

The data-parallel replicas of a shard read different rows, so their sum is not an
all-reduce of equal-sized tensors: `reduce_over_replicas` all-gathers every replica's
(rows, gradient rows) and merges them in replica order, which gives each replica the
same bits (the sum a dense all-reduce would give, up to fp32 addition order).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.reference import sorted_segment_sum
from pretrain.parallel.comm import all_gather_single


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


class _AccumulateRows(torch.autograd.Function):
    """Identity on the shard; backward merges the lookup's sparse gradient into shard.grad."""

    @staticmethod
    def forward(ctx, shard):
        ctx.shard = shard  # a leaf: no reference cycle through the graph
        return shard.view_as(shard)

    @staticmethod
    def backward(ctx, grad):
        add_rows(ctx.shard, grad)
        return None  # accumulated here: autograd's own (CUDA: concatenating) add never sees it


def accumulating(shard: torch.Tensor) -> torch.Tensor:
    """The shard, for one lookup whose sparse value gradient is merged into shard.grad as it arrives."""
    return _AccumulateRows.apply(shard)


def add_rows(shard: torch.Tensor, grad: torch.Tensor) -> None:
    """shard.grad += grad (row-sparse), each row once, ascending: (held + new) per row, one fp32 add,
    so the same bits on every run and rank. Writes into the held rows when they cover the new ones."""
    new_rows, new_grads = rows_of(grad, shard.shape[1], shard)  # the bag's: unique, ascending
    held = shard.grad
    if held is None:
        shard.grad = as_sparse(new_rows, new_grads, shard.shape)
        return
    held_rows, held_grads = held._indices()[0], held._values()
    rows, where = torch.unique(torch.cat([held_rows, new_rows]), sorted=True, return_inverse=True)
    count = held_rows.numel()
    if rows.numel() == count:  # every new row is held: no (rows, width) tensor allocated
        held_grads.index_add_(0, where[count:], new_grads)
        return
    summed = held_grads.new_zeros(rows.numel(), held_grads.shape[1])
    summed.index_copy_(0, where[:count], held_grads)
    summed.index_add_(0, where[count:], new_grads)  # unique targets: no two adds meet
    shard.grad = as_sparse(rows, summed, shard.shape)


def merge(rows: torch.Tensor, grad_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum gradient rows that share a row id, in entry order: (unique rows, summed rows)."""
    return sorted_segment_sum(rows, grad_rows)


def as_sparse(rows: torch.Tensor, grad_rows: torch.Tensor, shape) -> torch.Tensor:
    """A coalesced sparse COO gradient of `shape` holding `grad_rows` at (unique, ascending) `rows`."""
    return torch.sparse_coo_tensor(rows[None], grad_rows, tuple(shape), is_coalesced=True, check_invariants=False)


def reduce_over_replicas(rows: torch.Tensor, grad_rows: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Sum the row gradients of every rank in `group`; return (rows, summed rows, bytes received)."""
    size = dist.get_world_size(group)
    counts = torch.empty(size, dtype=torch.int64, device=rows.device)
    all_gather_single(counts, torch.tensor([rows.numel()], dtype=torch.int64, device=rows.device), group=group)
    counts = counts.tolist()
    longest, width = max(counts), grad_rows.shape[1]
    pad = longest - rows.numel()
    padded_rows = torch.cat([rows, rows.new_zeros(pad)])
    padded_grads = torch.cat([grad_rows, grad_rows.new_zeros(pad, width)])
    all_rows = rows.new_empty(size * longest)
    all_grads = grad_rows.new_empty(size * longest, width)
    all_gather_single(all_rows, padded_rows, group=group)
    all_gather_single(all_grads, padded_grads, group=group)
    keep = [slice(r * longest, r * longest + c) for r, c in enumerate(counts)]
    merged = merge(torch.cat([all_rows[s] for s in keep]), torch.cat([all_grads[s] for s in keep]))
    # padded to the longest replica's row count: the bytes all_gather moves, not the useful ones
    received = (size - 1) * (8 + longest * (8 + width * grad_rows.element_size()))
    return merged[0], merged[1], received
