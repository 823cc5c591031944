"""PyTorch reference for the memory-layer hot paths: the ground truth and the CPU path.

Shapes (T tokens, H memory heads, K slots read per head, n = n_keys, N = n**2 slots):
  query      (T, H, k_dim)          float
  keys1/2    (H, n, k_dim // 2)     float, the two half-key sets
  weights    (T, H, K)              softmax over the K selected scores
  indices    (T, H, K)              int64 slot ids in [0, N): i1 * n + i2
  values     (N, d)                 float32 / bfloat16 value rows
  bag output (T, d)                 sum over heads and slots of weight * value row

Gradients flow through autograd: `topk` and `gather` route them to the selected
half-key scores, hence to the query and the keys.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pkm_scores_topk(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int):
    """Product-key search: top-k raw scores and slot indices, shapes (T, H, k) each."""
    half = keys1.shape[-1]
    q1, q2 = query[..., :half], query[..., half:]
    s1 = torch.einsum("thd,hnd->thn", q1, keys1)
    s2 = torch.einsum("thd,hnd->thn", q2, keys2)
    v1, i1 = s1.topk(k, dim=-1)
    v2, i2 = s2.topk(k, dim=-1)
    cand = v1.unsqueeze(-1) + v2.unsqueeze(-2)  # (T, H, k, k) candidate sums
    scores, flat = cand.flatten(-2).topk(k, dim=-1)
    n_keys = keys1.shape[1]
    indices = i1.gather(-1, flat // k) * n_keys + i2.gather(-1, flat % k)
    return scores, indices


def pkm_topk(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int):
    """Product-key search followed by a softmax over the k selected scores."""
    scores, indices = pkm_scores_topk(query, keys1, keys2, k)
    # at least fp32 (bf16/fp16 upcast), but never below the input's precision (float64 stays)
    acc = torch.promote_types(scores.dtype, torch.float32)
    return scores.to(acc).softmax(dim=-1).to(query.dtype), indices


def brute_force_topk(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int):
    """Exact top-k over all N = n**2 combined keys (tests and the --sweep benchmark only)."""
    half = keys1.shape[-1]
    s1 = torch.einsum("thd,hnd->thn", query[..., :half], keys1)
    s2 = torch.einsum("thd,hnd->thn", query[..., half:], keys2)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (T, H, N)
    scores, indices = full.topk(k, dim=-1)
    return scores.softmax(dim=-1), indices


def embedding_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the selected value rows per token, over heads and slots: (T, d).

    Uses `F.embedding_bag` (one bag of H*K rows per token); accumulation happens in
    the values' dtype except that bf16 is upcast to fp32 and cast back.
    """
    T = indices.shape[0]
    flat_idx = indices.reshape(T, -1)
    flat_w = weights.reshape(T, -1)
    table = values.float() if values.dtype in (torch.bfloat16, torch.float16) else values
    out = F.embedding_bag(flat_idx, table, per_sample_weights=flat_w.to(table.dtype), mode="sum")
    return out.to(values.dtype)


def embedding_bag_gather(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same bag as gather + weighted sum (a second, independent formulation)."""
    rows = values[indices.reshape(indices.shape[0], -1)]  # (T, H*K, d)
    return (rows * weights.reshape(indices.shape[0], -1, 1).to(rows.dtype)).sum(dim=1)
