"""A value shard's row-sparse gradient, added to lookup by lookup as each backward ends.

With a sparse value optimizer each lookup's bag hands the shard a coalesced sparse gradient
(its U distinct rows). Left to autograd, the lookups of one backward (memory layers on a
shared table) and the micro-batches are added by torch's sparse add, which on CUDA
concatenates the entries (`add_out_sparse_cuda` never merges, to spare a host read of the
result's size) and on the CPU merges two sorted operands: on a GPU the gradient held grew
with lookups x micro-batches, up to the table's rows per lookup.

`accumulating(shard)` stands between the shard and each lookup: its backward adds that
lookup's rows into the shard's gradient at once and hands autograd nothing. The rows are
held in arrival order in a buffer with room for half as many again (never more than the
table's N rows), with an (N,) int64 map from row to its place: a row not held yet gets a
zeroed place at the end, then the lookup's gradient rows are added at their places (0 + g
or held + g, one add per row: the same bits on every run and on every rank that reads the
same rows). Each add touches only the lookup's rows, never the whole held gradient (but
a growth of the buffer copies the held rows once). The step's first lookup's gradient is kept as the bag made it (a step of
one lookup costs nothing more); from the second on, `shard.grad` is a sparse COO view of
the buffer's filled part, flagged uncoalesced (the rows are unique but not ascending): `row_grads.rows_of` sorts them at the
step. The gradient reaches shard.grad only, through backward(): torch.autograd.grad with
respect to the shard finds it unused.
"""

from __future__ import annotations

import torch

from pretrain.parallel.row_grads import rows_of


class _AccumulateRows(torch.autograd.Function):
    """Identity on the shard; backward adds the lookup's sparse gradient into shard.grad."""

    @staticmethod
    def forward(ctx, shard):
        ctx.shard = shard  # a leaf: no reference cycle through the graph
        return shard.view_as(shard)

    @staticmethod
    def backward(ctx, grad):
        add_rows(ctx.shard, grad)
        return None  # added here: autograd's own (CUDA: concatenating) add never sees it


def accumulating(shard: torch.Tensor) -> torch.Tensor:
    """The shard, for one lookup whose sparse value gradient is added into shard.grad as it arrives."""
    return _AccumulateRows.apply(shard)


class HeldRows:
    """The rows a shard's gradient holds (arrival order), their gradient rows, and each row's place."""

    def __init__(self, shard: torch.Tensor):
        self.num_rows = shard.shape[0]
        self.place: torch.Tensor | None = None  # made by the first add: a step of one lookup needs none
        self.rows = torch.empty(0, dtype=torch.int64, device=shard.device)
        self.grads = shard.new_empty(0, shard.shape[1])
        self.count = 0
        self.grad: torch.Tensor | None = None  # the sparse view last handed to shard.grad

    def clear(self) -> None:
        if self.count:
            self.place[self.rows[: self.count]] = -1
        self.count = 0

    def release(self) -> None:
        """Hold nothing and drop the buffer (the (N,) map stays, all -1)."""
        self.clear()
        self.rows, self.grads, self.grad = self.rows[:0].clone(), self.grads[:0].clone(), None

    def _reserve(self, needed: int) -> None:
        """Room for `needed` rows: half as many again, at most the table's rows (a growth copies the held ones)."""
        if needed <= self.rows.numel():
            return
        capacity = min(self.num_rows, needed + needed // 2)
        rows, grads = self.rows.new_empty(capacity), self.grads.new_empty(capacity, self.grads.shape[1])
        rows[: self.count], grads[: self.count] = self.rows[: self.count], self.grads[: self.count]
        self.rows, self.grads = rows, grads

    def add(self, rows: torch.Tensor, grad_rows: torch.Tensor) -> None:
        """Add unique `rows`' gradient rows: a row not held yet gets a zeroed place at the end first, so
        one index_add covers them all (unique targets: no two adds meet)."""
        if self.place is None:
            self.place = torch.full((self.num_rows,), -1, dtype=torch.int64, device=rows.device)
        fresh = rows[self.place[rows] < 0]
        new = fresh.numel()  # host read: the buffer's size
        if new:
            self._reserve(self.count + new)
            end = self.count + new
            self.place[fresh] = torch.arange(self.count, end, device=rows.device)
            self.rows[self.count : end] = fresh
            self.grads[self.count : end] = 0
            self.count = end
        self.grads.index_add_(0, self.place[rows], grad_rows)

    def as_grad(self, shape) -> torch.Tensor:
        rows, grads = self.rows[: self.count], self.grads[: self.count]
        self.grad = torch.sparse_coo_tensor(rows[None], grads, tuple(shape), is_coalesced=False, check_invariants=False)
        return self.grad


def add_rows(shard: torch.Tensor, grad: torch.Tensor) -> None:
    """shard.grad += grad (row-sparse), each row held once. The step's first lookup's gradient is kept
    as the bag made it (no copy: a step of one lookup costs nothing more); the buffer starts at the second."""
    held = getattr(shard, "_held_rows", None)
    if held is None:
        held = HeldRows(shard)
        shard._held_rows = held
    if shard.grad is None or shard.grad is not held.grad:  # cleared (zero_grad) or replaced since the last add
        held.clear()
        held.grad = None
        if shard.grad is None:
            shard.grad = held.grad = grad
            return
    if held.count == 0:  # the first lookup's gradient, or one set from outside: into the buffer first
        held.add(*rows_of(shard.grad, shard.shape[1], shard))
    held.add(*rows_of(grad, shard.shape[1], shard))  # the bag's: unique, ascending
    shard.grad = held.as_grad(shard.shape)


def release(shard: torch.Tensor) -> None:
    """Forget the rows added so far and free their buffer: once the step has taken the gradient
    (`MemoryParallel.reduce_gradients` merges it into a copy), so that the two are not both held."""
    held = getattr(shard, "_held_rows", None)
    if held is not None:
        held.release()
