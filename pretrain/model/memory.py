"""The product-key memory layer ("Memory+") and the value table it reads.

A `ValueTable` owns the (N, v_dim) value rows and turns (indices, weights) into the
weighted bag. A `MemoryPlus` layer owns one layer's query projection, product keys
and gating, and reads a value table handed to it at call time, so that one table can
be shared by several layers and swapped for a partitioned one by the parallelize step
without touching this code.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from pretrain.model.config import ConfigError, ModelConfig


class ValueTable(nn.Module):
    """N value rows of width v_dim, read by a weighted embedding bag."""

    def __init__(self, num_slots: int, v_dim: int, kernel: str = "auto"):
        super().__init__()
        self.num_slots, self.v_dim, self.kernel = num_slots, v_dim, kernel
        self.weight = nn.Parameter(torch.empty(num_slots, v_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.v_dim**-0.5)

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return kernels.embedding_bag(self.weight, indices, weights, backend=self.kernel)


class MemoryPlus(nn.Module):
    """Memory+: out = W2(bag(values; topk(q, product keys)) * silu(W1 x))."""

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
        self.last_indices: torch.Tensor | None = None  # (B*S, H, k), for slot statistics
        self.last_weights: torch.Tensor | None = None
        self.reset_keys()

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
        return kernels.pkm_topk(q, keys1.to(q.dtype), keys2.to(q.dtype), self.k, backend=self.kernel)

    def forward(self, x: torch.Tensor, values: nn.Module) -> torch.Tensor:
        if getattr(values, "v_dim", self.v_dim) != self.v_dim:
            raise ConfigError(
                f"value table width {values.v_dim} does not match model.memory.v_dim={self.v_dim}"
            )
        weights, indices = self.search(x)
        self.last_indices, self.last_weights = indices.detach(), weights.detach()
        bag = values(indices, weights).reshape(*x.shape[:-1], self.v_dim).to(x.dtype)
        return self.out_proj(bag * F.silu(self.gate_proj(x)))
