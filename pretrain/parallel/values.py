"""The value table split by columns over a memory group, and the swap into a built model.

`PartitionedValueTable` holds this rank's column shard (N, v_dim / P) as a leaf
tensor that is NOT a registered parameter: module.parameters(), state_dict(),
.to()/.bfloat16() and DeepSpeed never see it (MemoryParallel owns its optimizer,
gradient reduction and checkpoints). Forward, for tokens (T, H, k) on each rank:

  all-gather the group's indices and weights  (T_all, H, k), weights keep autograd
  bag over this rank's columns for all tokens  (T_all, v_dim / P)
  all-to-all: each token's slice to its rank   (P * T, v_dim / P) -> (T, v_dim)

Every rank of a memory group must run the same lookups in the same order (forward
and backward), as the collectives pair up across ranks; token counts may differ.

Under activation checkpointing the collectives run once, on the real forward: the
gathered indices/weights and the exchanged output are recorded on the region's
`LookupTape` and replayed by the recomputation, which only re-runs the local bag (to
rebuild the tensors its backward saves). The output kept per lookup is (T, v_dim), the
size of one hidden state; the gathered indices/weights are (P * T, H, k).
"""

from __future__ import annotations

import torch
import torch.nn as nn

import kernels.ops
from pretrain import profiler_regions as regions
from pretrain.model import recompute
from pretrain.model.config import ConfigError
from pretrain.model.memory import ValueTable
from pretrain.parallel import held_rows
from pretrain.parallel.comm import CommCounter, all_gather_rows, all_to_all_rows, exchange_counts
from pretrain.parallel.groups import MemoryGroups


def shard_columns(v_dim: int, parallel_size: int, position: int) -> tuple[int, int]:
    """[start, end) columns of shard `position` out of `parallel_size`."""
    width = v_dim // parallel_size
    return position * width, (position + 1) * width


class PartitionedValueTable(nn.Module):
    """This rank's columns of a value table of N rows and width v_dim (the logical table)."""

    def __init__(
        self,
        num_slots: int,
        v_dim: int,
        groups: MemoryGroups,
        *,
        seed: int = 0,
        kernel: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        value_grad: str = "sorted",
    ):
        super().__init__()
        P = groups.parallel_size
        if v_dim % P:
            raise ConfigError(
                f"model.memory.parallel_size={P} does not divide the value dim {v_dim} "
                "(model.memory.v_dim, or model.dim when v_dim=0): choose a divisor of it"
            )
        self.num_slots, self.v_dim, self.kernel, self.seed, self.groups = num_slots, v_dim, kernel, seed, groups
        self.value_grad = value_grad  # "sparse": the shard's gradient holds only the rows read
        self.col_start, self.col_end = shard_columns(v_dim, P, groups.position)
        self.counter = CommCounter()
        shard = nn.Parameter(torch.empty(num_slots, self.col_end - self.col_start, device=device, dtype=dtype))
        object.__setattr__(self, "shard", shard)  # bypass nn.Module registration on purpose
        self.reset_parameters()

    @property
    def parallel_size(self) -> int:
        return self.groups.parallel_size

    def reset_parameters(self) -> None:
        """Draw this rank's columns of the sharding-invariant initialisation (no full table)."""
        if self.shard.device.type == "cpu":
            ValueTable.init_columns(self.shard.data, self.v_dim, self.col_start, self.seed)
            return
        cpu = torch.empty(self.shard.shape, dtype=self.shard.dtype)
        ValueTable.init_columns(cpu, self.v_dim, self.col_start, self.seed)
        self.shard.data.copy_(cpu)

    def extra_repr(self) -> str:
        return (
            f"num_slots={self.num_slots}, v_dim={self.v_dim}, columns=[{self.col_start}, {self.col_end}), "
            f"parallel_size={self.parallel_size}"
        )

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """indices, weights (T, H, k) -> bag (T, v_dim), in the shard's dtype."""
        if indices.shape != weights.shape:
            raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must match")
        P = self.parallel_size
        if P == 1:
            return self._bag(indices, weights)
        T = indices.shape[0]
        tape = recompute.current_tape()
        if tape is not None and tape.replaying:
            # leaves with the real forward's requires_grad, so that the ops after the lookup
            # save the same tensors as they did then (their gradients are never taken)
            all_idx, all_w, mine = (t.requires_grad_(flag) for t, flag in tape.replay())
            self._bag(all_idx, all_w)  # its saved tensors only
            return self._join_columns(mine, T)
        counts, all_idx, all_w = self._gather_group_inputs(indices, weights)
        part = self._bag(all_idx, all_w)
        mine = self._return_rows(part, counts, T)  # (P * T, v_dim / P)
        if tape is not None:
            tape.record(tuple((t.detach(), t.requires_grad) for t in (all_idx, all_w, mine)))
        return self._join_columns(mine, T)

    def _join_columns(self, mine: torch.Tensor, tokens: int) -> torch.Tensor:
        """This rank's tokens' bag slices from every shard, (P * T, v_dim / P) in shard order, as
        (T, v_dim): shard r's slice fills columns [r * v_dim / P, (r + 1) * v_dim / P)."""
        return mine.view(self.parallel_size, tokens, mine.shape[1]).permute(1, 0, 2).reshape(tokens, self.v_dim)

    def _bag(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The shard's bag. Top-k indices are i1 * n_keys + i2 < num_slots by construction: no range
        check (a host read, on a GPU a wait for the queued work in every layer and micro-batch)."""
        if self.value_grad == "sparse":
            return self._sparse_bag(indices, weights)
        return kernels.ops.embedding_bag(
            self.shard, indices, weights, backend=self.kernel, value_grad=self.value_grad, check_indices=False
        )

    def _sparse_bag(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The bag with a row-sparse gradient, merged into shard.grad lookup by lookup (`held_rows.accumulating`);
        eager under train.compile (`pretrain.parallel.compile`)."""
        return kernels.ops.embedding_bag(
            held_rows.accumulating(self.shard),
            indices,
            weights,
            backend=self.kernel,
            value_grad="sparse",
            check_indices=False,
        )

    # The two collective steps of a lookup, as methods of their own so that
    # `pretrain.parallel.compile.apply_compile` can keep them out of compiled graphs.
    def _gather_group_inputs(self, indices: torch.Tensor, weights: torch.Tensor):
        """(every rank's token count, the group's indices, the group's weights)."""
        group = self.groups.memory_group
        with torch.profiler.record_function(regions.COMMUNICATION):  # named for pretrain/profiling.py
            counts = exchange_counts(indices.shape[0], group, self.counter, indices.device)
            return (
                counts,
                all_gather_rows(indices, counts, group, self.counter),
                all_gather_rows(weights, counts, group, self.counter),
            )

    def _return_rows(self, part: torch.Tensor, counts: list[int], tokens: int) -> torch.Tensor:
        """Each rank's tokens' slices of this shard's bag output, back to that rank."""
        with torch.profiler.record_function(regions.COMMUNICATION):
            P = self.parallel_size
            return all_to_all_rows(part, counts, [tokens] * P, self.groups.memory_group, self.counter)


def parallelize_memory(
    model: nn.Module,
    groups: MemoryGroups,
    *,
    kernel: str = "auto",
    device: torch.device | str | None = None,
    seed: int | None = None,
    value_grad: str = "sorted",
) -> list[PartitionedValueTable]:
    """Replace every `model.values[i]` (a `ValueTable`) by its partitioned version; return the new tables.

    Table i is initialised with seed base + i, where base is `seed` or, when None, the
    seed of the model's first table (ValueTable's default is 0). value_grad="sparse"
    makes each shard's gradient a coalesced sparse COO tensor of the rows read.
    """
    values = model.values  # empty in a model without memory layers
    base = seed if seed is not None else values[0].seed if len(values) else 0
    tables = []
    for i, table in enumerate(values):
        if isinstance(table, PartitionedValueTable):
            raise ValueError(f"model.values[{i}] is already partitioned: call parallelize_memory once per model")
        new = PartitionedValueTable(
            table.num_slots,
            table.v_dim,
            groups,
            seed=base + i,
            kernel=kernel,
            device=device,
            dtype=table.weight.dtype,
            value_grad=value_grad,
        )
        values[i] = new
        tables.append(new)
    return tables
