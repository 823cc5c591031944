"""The product-key memory layer ("Memory+") and the value table it reads.

A `ValueTable` owns the (N, v_dim) value rows and turns (indices, weights) into the
weighted bag. A `MemoryPlus` layer owns one layer's query projection, product keys
and gating, and reads a value table handed to it at call time, so that one table can
be shared by several layers and swapped for a partitioned one by the parallelize step
without touching this code.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
import kernels.ops
from pretrain import profiler_regions as regions
from pretrain.model import recompute
from pretrain.model.config import ConfigError, ModelConfig


class ValueTable(nn.Module):
    """N value rows of width v_dim, read by a weighted embedding bag.

    Initialisation is sharding-invariant: the table is cut into tiles of
    INIT_ROW_BLOCK x INIT_COL_BLOCK, each drawn from its own CPU generator seeded by
    (seed, column block, row block). Any column slice of the table can therefore be
    generated alone (`init_columns`) and equals the same slice of the full table, so a
    memory-parallel rank initialises only its own shard, for any group size.
    """

    INIT_COL_BLOCK = 64
    INIT_ROW_BLOCK = 65536

    def __init__(self, num_slots: int, v_dim: int, kernel: str = "auto", *, seed: int = 0):
        super().__init__()
        self.num_slots, self.v_dim, self.kernel, self.seed = num_slots, v_dim, kernel, seed
        self.weight = nn.Parameter(torch.empty(num_slots, v_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.device.type != "meta":
            self.init_columns(self.weight, self.v_dim, 0, self.seed)

    @classmethod
    def init_columns(cls, out: torch.Tensor, v_dim: int, col_start: int, seed: int) -> None:
        """Fill `out` (N, width) with columns [col_start, col_start + width) of the table
        of width v_dim seeded by `seed`; normal with std v_dim**-0.5."""
        num_slots, width = out.shape
        col_end, std = col_start + width, v_dim**-0.5
        if not 0 <= col_start <= col_end <= v_dim:
            raise ValueError(f"columns [{col_start}, {col_end}) lie outside a table of width {v_dim}")
        cb, rb = cls.INIT_COL_BLOCK, cls.INIT_ROW_BLOCK
        with torch.no_grad():
            for block in range(col_start // cb, (col_end + cb - 1) // cb):
                b0, b1 = block * cb, min((block + 1) * cb, v_dim)
                lo, hi = max(b0, col_start), min(b1, col_end)
                for r0 in range(0, num_slots, rb):
                    r1 = min(r0 + rb, num_slots)
                    # a fixed, sharding-independent tile: the same numbers whoever draws it
                    gen = torch.Generator().manual_seed(((seed * 1_000_003 + block) * 1_000_003 + r0 // rb) % 2**63)
                    tile = torch.randn(r1 - r0, b1 - b0, generator=gen).mul_(std)
                    out[r0:r1, lo - col_start : hi - col_start].copy_(tile[:, lo - b0 : hi - b0])

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # top-k indices are i1 * n_keys + i2 < n_keys**2, this table's rows: no range check (a
        # host read, on a GPU a wait for the queued work in every layer and micro-batch)
        return kernels.ops.embedding_bag(self.weight, indices, weights, backend=self.kernel, check_indices=False)


LookupHook = Callable[["MemoryPlus", torch.Tensor, torch.Tensor], None]


class MemoryPlus(nn.Module):
    """Memory+: out = W2(bag(values; topk(q, product keys)) * silu(W1 x)).

    Slot hand-over: `register_lookup_hook(hook)` makes every real forward call
    hook(layer, indices, weights) with the detached (B*S, heads, k) slot indices and
    weights; an activation checkpoint's recomputation calls no hook (see
    pretrain/model/recompute.py), so readers such as the slot counters see each lookup
    once. `last_indices` / `last_weights` hold the same tensors for interactive readers
    (export, finetuning, tools), also set on real forwards only.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.memory
        self.heads, self.k, self.k_dim, self.n_keys = m.heads, m.k, m.k_dim, m.n_keys
        self.v_dim, self.kernel, self.qk_norm = cfg.value_dim, m.kernel, m.qk_norm
        half = m.k_dim // 2
        self.query_proj = nn.Linear(cfg.dim, m.heads * m.k_dim, bias=False)
        self.query_norm = nn.RMSNorm(half, eps=cfg.norm_eps) if m.qk_norm else nn.Identity()
        self.keys1 = nn.Parameter(torch.empty(m.heads, m.n_keys, half))
        self.keys2 = nn.Parameter(torch.empty(m.heads, m.n_keys, half))
        self.gate_proj = nn.Linear(cfg.dim, self.v_dim, bias=False)  # W1
        self.out_proj = nn.Linear(self.v_dim, cfg.dim, bias=False)  # W2
        self.last_indices: torch.Tensor | None = None  # (B*S, H, k), for interactive readers (see above)
        self.last_weights: torch.Tensor | None = None
        self._lookup_hooks: OrderedDict[int, LookupHook] = OrderedDict()
        kernels.ops.register_flop_formulas()  # so that a FlopCounterMode created later sees the scoring
        self.reset_keys()

    def register_lookup_hook(self, hook: LookupHook) -> torch.utils.hooks.RemovableHandle:
        """Call hook(layer, indices, weights) once per real forward; returns a removable handle."""
        handle = torch.utils.hooks.RemovableHandle(self._lookup_hooks)
        self._lookup_hooks[handle.id] = hook
        return handle

    def reset_keys(self) -> None:
        bound = 1.0 / math.sqrt(self.k_dim)
        nn.init.uniform_(self.keys1, -bound, bound)
        nn.init.uniform_(self.keys2, -bound, bound)

    def search(self, x: torch.Tensor):
        """Slot weights and indices for x (B, S, dim): each (B*S, heads, k)."""
        q = self.query_proj(x).reshape(-1, self.heads, 2, self.k_dim // 2)
        keys1, keys2 = self.keys1, self.keys2
        if self.qk_norm:
            q = self.query_norm(q)
            keys1 = F.rms_norm(keys1, (keys1.shape[-1],))
            keys2 = F.rms_norm(keys2, (keys2.shape[-1],))
        q = q.flatten(-2)
        return kernels.ops.pkm_topk(q, keys1.to(q.dtype), keys2.to(q.dtype), self.k, backend=self.kernel)

    def forward(self, x: torch.Tensor, values: nn.Module) -> torch.Tensor:
        """x (B, S, dim) -> (B, S, dim). `values`: the value table this layer reads, a `ValueTable`
        or pretrain/parallel's `PartitionedValueTable` (either: values(indices, weights) -> (T, v_dim))."""
        if values.v_dim != self.v_dim:
            raise ConfigError(f"value table width {values.v_dim} does not match model.memory.v_dim={self.v_dim}")
        with torch.profiler.record_function(regions.SCORING):
            weights, indices = self.search(x)
        if not recompute.recomputing():
            self.last_indices, self.last_weights = indices.detach(), weights.detach()
            for hook in self._lookup_hooks.values():
                hook(self, self.last_indices, self.last_weights)
        with torch.profiler.record_function(regions.BAG_FORWARD):
            bag = values(indices, weights).reshape(*x.shape[:-1], self.v_dim).to(x.dtype)
        return self.out_proj(bag * F.silu(self.gate_proj(x)))
