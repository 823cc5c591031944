"""Differentiable collectives over a memory group, with a count of the bytes received.

`all_gather_rows` concatenates every rank's rows (any row counts); its backward sends
each rank the gradient of its own rows, summed over the group. `all_to_all_rows`
exchanges row blocks; its backward is the reverse exchange. Both run the same
collectives on every rank of the group, in the same order, in forward and backward.
Byte counts are the bytes this rank receives from other ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (the old name now warns once per rank); the GPU
# machines' torch 2.11 has only the old name.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CommCounter:
    """Bytes received by this rank through the memory-group collectives."""

    def __init__(self):
        self.bytes = 0

    def add(self, n: int) -> None:
        self.bytes += int(n)

    def take(self) -> int:
        n, self.bytes = self.bytes, 0
        return n


def _row_bytes(t: torch.Tensor) -> int:
    return t[0].numel() * t.element_size() if t.shape[0] else 0


def exchange_counts(rows: int, group, counter: CommCounter, device) -> list[int]:
    """Every rank's row count, in group order."""
    size = dist.get_world_size(group)
    mine = torch.tensor([rows], dtype=torch.int64, device=device)
    out = torch.empty(size, dtype=torch.int64, device=device)
    all_gather_single(out, mine, group=group)
    counter.add((size - 1) * 8)
    return out.tolist()


def _gather(x: torch.Tensor, counts: list[int], group, counter: CommCounter) -> torch.Tensor:
    size, longest = len(counts), max(counts)
    x = x.contiguous()
    if x.shape[0] < longest:  # uneven groups: pad to the longest, then drop the padding
        x = torch.cat([x, x.new_zeros(longest - x.shape[0], *x.shape[1:])])
    out = x.new_empty(size * longest, *x.shape[1:])
    all_gather_single(out, x, group=group)
    counter.add((size - 1) * longest * _row_bytes(x) if longest else 0)
    if all(c == longest for c in counts):
        return out
    return torch.cat([out[r * longest : r * longest + c] for r, c in enumerate(counts)])


def _exchange(x, in_splits, out_splits, group, counter: CommCounter) -> torch.Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    rank = dist.get_rank(group)
    counter.add((sum(out_splits) - out_splits[rank]) * _row_bytes(out))
    return out


class _AllGatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, counts, group, counter):
        ctx.counts, ctx.group, ctx.counter = counts, group, counter
        return _gather(x, counts, group, counter)

    @staticmethod
    def backward(ctx, grad):
        counts, rank = ctx.counts, dist.get_rank(ctx.group)
        mine = counts[rank]
        # row block r of grad belongs to rank r; every rank returns its copy's gradient
        back = _exchange(grad, counts, [mine] * len(counts), ctx.group, ctx.counter)
        return back.view(len(counts), mine, *grad.shape[1:]).sum(0), None, None, None


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, in_splits, out_splits, group, counter):
        ctx.splits, ctx.group, ctx.counter = (in_splits, out_splits), group, counter
        return _exchange(x, in_splits, out_splits, group, counter)

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        return _exchange(grad, out_splits, in_splits, ctx.group, ctx.counter), None, None, None, None


def all_gather_rows(x: torch.Tensor, counts: list[int], group, counter: CommCounter) -> torch.Tensor:
    """Concatenate every group rank's x (counts[r] rows each); differentiable when x requires grad."""
    if x.requires_grad:
        return _AllGatherRows.apply(x, counts, group, counter)
    return _gather(x, counts, group, counter)


def all_to_all_rows(x: torch.Tensor, in_splits: list[int], out_splits: list[int], group, counter: CommCounter):
    """Send rows x[sum(in_splits[:r]) : ...] to rank r; receive out_splits[r] rows from rank r."""
    return _AllToAllRows.apply(x, in_splits, out_splits, group, counter)
