"""PyTorch reference for the memory-layer hot paths: the ground truth and the CPU path.

Shapes (T tokens, H memory heads, K slots read per head, n = n_keys, N = n**2 slots):
  query      (T, H, k_dim)          float
  keys1/2    (H, n, k_dim // 2)     float, the two half-key sets
  weights    (T, H, K)              softmax over the K selected scores
  indices    (T, H, K)              int64 slot ids in [0, N): i1 * n + i2
  values     (N, d)                 float32 / bfloat16 value rows
  bag output (T, d)                 sum over heads and slots of weight * value row

Scoring runs in at least fp32 whatever the inputs' dtype (bf16 queries and keys are
upcast, as the Triton kernel accumulates in fp32), so both backends select the same slots.
Gradients flow through autograd: `topk` and `gather` route them to the selected
half-key scores, hence to the query and the keys.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from kernels import cpu_ops

# Half-key scores held at once, per half. On CPU a cache-sized block (2 MiB of fp32); on an
# accelerator the paper's whole batch (32K tokens x 4 heads x 1024 keys, 512 MiB of fp32),
# because there the chunks' small launches dominate: in 128-token chunks the PyTorch scoring
# forward took 108.8 ms on an H200 against 9.0 ms unchunked on an H100 (benchmarks/).
SCORE_CHUNK_ELEMENTS = 1 << 19
ACCELERATOR_SCORE_CHUNK_ELEMENTS = 1 << 27


def pkm_scores_topk(
    query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int, score_dtype: torch.dtype | None = None
):
    """Product-key search: top-k raw scores and slot indices, shapes (T, H, k) each.

    Scores are computed and returned in at least fp32 (bf16/fp16 inputs upcast, float64
    stays), half-key scores and candidate sums alike: the Triton kernel's fp32 accumulation.
    `score_dtype` overrides that (the benchmark's baseline scores bf16 inputs in bf16: the
    fastest PyTorch formulation, not an exact one).

    On CPU, tokens are searched in chunks so that the (tokens, H, n_keys) half-key scores
    never exist for the whole batch at once (64 MiB per half at 1024 tokens, 4 heads, n_keys
    4096); on an accelerator the chunks are whole batches (`score_chunk_rows`). The chunks'
    results are concatenated (autograd flows through either way)."""
    T, H, n = query.shape[0], keys1.shape[0], keys1.shape[1]
    rows = score_chunk_rows(query.device, H, n)
    if T <= rows:
        return _scores_topk(query, keys1, keys2, k, score_dtype)
    parts = [_scores_topk(query[t0 : t0 + rows], keys1, keys2, k, score_dtype) for t0 in range(0, T, rows)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def score_chunk_rows(device: torch.device, heads: int, n_keys: int) -> int:
    """Tokens searched at once by `pkm_scores_topk` on `device` (see SCORE_CHUNK_ELEMENTS)."""
    budget = SCORE_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_SCORE_CHUNK_ELEMENTS
    return max(1, budget // max(1, heads * n_keys))


def _scores_topk(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int, score_dtype=None):
    half, n_keys = keys1.shape[-1], keys1.shape[1]
    # At least fp32 (bf16/fp16 upcast, float64 stays), as the Triton kernel accumulates: bf16
    # scores (~3 significant digits) would change the selected slots and their weights.
    acc = score_dtype or torch.promote_types(query.dtype, torch.float32)
    # scores laid out (H, tokens, n_keys), as bmm writes them: the top-k reads whole rows
    # (a (tokens, H, n_keys) view would be copied for the prefilter's reshape)
    q = query.transpose(0, 1).to(acc)
    s1 = torch.bmm(q[..., :half], keys1.transpose(1, 2).to(acc))
    s2 = torch.bmm(q[..., half:], keys2.transpose(1, 2).to(acc))
    v1, i1 = half_topk(s1, k)  # sorted: descending
    v2, i2 = half_topk(s2, k)
    # the top k of the k*k sums v1[a] + v2[b] lie among the ~k ln k pairs with
    # (a+1)(b+1) <= k: the (a+1)(b+1) - 1 pairs that dominate (a, b) are at least as large
    a, b = candidate_pairs(k, query.device)
    scores, sel = (v1[..., a] + v2[..., b]).topk(k, dim=-1)
    indices = i1.gather(-1, a[sel]) * n_keys + i2.gather(-1, b[sel])
    return scores.transpose(0, 1).contiguous(), indices.transpose(0, 1).contiguous()


def half_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores.topk(k, dim=-1)`: the same values, descending; on CPU through the compiled
    row top-k (`kernels.cpu_ops`, ties: the lower index first). The values are gathered
    at its indices, so gradients flow as through topk (a scatter onto distinct indices)."""
    if scores.device.type == "cpu":
        indices = cpu_ops.row_topk_indices(scores, k)
        if indices is not None:
            return scores.gather(-1, indices), indices
    return scores.topk(k, dim=-1)


@functools.lru_cache(maxsize=64)
def candidate_pairs(k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (a, b) of the pairs with (a+1)(b+1) <= k, row-major: sum_a floor(k / a) of them."""
    pairs = torch.tensor([(a, b) for a in range(k) for b in range(k) if (a + 1) * (b + 1) <= k], device=device)
    return pairs[:, 0], pairs[:, 1]


def pkm_topk(
    query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int, score_dtype: torch.dtype | None = None
):
    """Product-key search followed by a softmax over the k selected scores; weights in the query's
    dtype. `score_dtype`: see `pkm_scores_topk` (None: at least fp32)."""
    scores, indices = pkm_scores_topk(query, keys1, keys2, k, score_dtype)
    return scores.softmax(dim=-1).to(query.dtype), indices


def pkm_topk_fp32(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int):
    """`pkm_topk` before the weights' cast to the query's dtype: the softmax of the scores,
    which are at least fp32 (float64 stays)."""
    scores, indices = pkm_scores_topk(query, keys1, keys2, k)
    return scores.softmax(dim=-1), indices


def brute_force_topk(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int):
    """Exact top-k over all N = n**2 combined keys (tests and the --sweep benchmark only)."""
    half = keys1.shape[-1]
    s1 = torch.einsum("thd,hnd->thn", query[..., :half], keys1)
    s2 = torch.einsum("thd,hnd->thn", query[..., half:], keys2)
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)  # (T, H, N)
    scores, indices = full.topk(k, dim=-1)
    return scores.softmax(dim=-1), indices


def fp32_rows_read(values: torch.Tensor, flat_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(table, rows) to read a bf16/fp16 pool in fp32: table[rows] == values[flat_idx].float().
    Other dtypes come back as they are.

    Lookups of fewer entries than half the pool (decoding, small batches) upcast only the rows
    they read: a fp32 copy of the whole pool per lookup made a bf16 export's decoding ~90x
    slower at 1M slots. Past that the sort in unique() costs more than the copy (one CPU
    thread, 1M x 128: break-even at ~0.55 entries per slot). Both give the same sums bit for bit."""
    if values.dtype not in (torch.bfloat16, torch.float16):
        return values, flat_idx
    if 2 * flat_idx.numel() < values.shape[0]:
        read, rows = flat_idx.unique(return_inverse=True)
        return values[read].float(), rows
    return values.float(), flat_idx


def embedding_bag(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted sum of the selected value rows per token, over heads and slots: (T, d).

    Uses `F.embedding_bag` (one bag of H*K rows per token); accumulation happens in
    the values' dtype except that bf16 is upcast to fp32 and cast back.
    """
    flat_idx = indices.flatten(1)  # (T, H*K): explicit widths, so T = 0 works
    flat_w = weights.flatten(1)
    table, flat_idx = fp32_rows_read(values, flat_idx)
    out = F.embedding_bag(flat_idx, table, per_sample_weights=flat_w.to(table.dtype), mode="sum")
    return out.to(values.dtype)


def embedding_bag_gather(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same bag as gather + weighted sum (a second, independent formulation)."""
    rows = values[indices.flatten(1)]  # (T, H*K, d)
    return (rows * weights.flatten(1).unsqueeze(-1).to(rows.dtype)).sum(dim=1)


class BagLayout(NamedTuple):
    """`n_bags` bags of `per_bag` consecutive entries each, in the arguments aten's bag kernels take."""

    offsets: torch.Tensor
    offset2bag: torch.Tensor
    bag_size: torch.Tensor


def bag_layout(n_bags: int, per_bag: int, device) -> BagLayout:
    return BagLayout(
        torch.arange(0, n_bags * per_bag, max(per_bag, 1), device=device)[:n_bags],
        torch.arange(n_bags, device=device).repeat_interleave(per_bag),
        torch.full((n_bags,), per_bag, dtype=torch.int64, device=device),
    )


def sorted_segment_sum(
    keys: torch.Tensor,
    source: torch.Tensor,
    source_rows: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    sort: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum rows sharing a key: (unique keys ascending (U,), summed rows (U, d)), never (N, d).

    Entry e contributes weights[e] * source[source_rows[e]] (source_rows defaults to e,
    weights to 1) to the row of keys[e]. The entries are stably sorted by key and each
    key's segment is one bag of `F.embedding_bag`, so the summation order is fixed (the
    entries' order within a key): the same inputs give bitwise the same sums. Sums are
    accumulated in fp32 at least (bf16/fp16 upcast) and returned in source's dtype.
    `sort`: the caller's `torch.sort(keys.reshape(-1), stable=True)`, if it has one.
    """
    keys = keys.reshape(-1)
    if keys.numel() == 0:
        return keys.new_empty(0), source.new_empty(0, *source.shape[1:])
    if source_rows is None:
        source_rows = torch.arange(keys.numel(), device=keys.device)
    sorted_keys, order = sort if sort is not None else torch.sort(keys, stable=True)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    unique = sorted_keys[starts]
    table = source.float() if source.dtype in (torch.bfloat16, torch.float16) else source
    w = None if weights is None else weights.reshape(-1)[order].to(table.dtype)
    summed = F.embedding_bag(
        source_rows.reshape(-1)[order], table, starts.nonzero().squeeze(1), per_sample_weights=w, mode="sum"
    )
    return unique, summed.to(source.dtype)


class _SparseGradBag(torch.autograd.Function):
    """`embedding_bag` whose value gradient is a coalesced sparse COO tensor of the read rows."""

    @staticmethod
    def forward(ctx, values, indices, weights):
        ctx.save_for_backward(values, indices, weights)
        return embedding_bag(values, indices, weights)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        T = indices.shape[0]
        flat_idx = indices.reshape(-1)
        layout = bag_layout(T, flat_idx.numel() // T if T else 0, indices.device)
        tokens = layout.offset2bag
        sort = torch.sort(flat_idx, stable=True)  # entries by value row: shared by both gradients
        grad_values = grad_weights = None
        if ctx.needs_input_grad[0]:
            rows, grad_rows = sorted_segment_sum(flat_idx, grad_out, tokens, weights, sort=sort)
            grad_values = torch.sparse_coo_tensor(
                rows[None], grad_rows.to(values.dtype), values.shape, is_coalesced=True, check_invariants=False
            )
        if ctx.needs_input_grad[2]:
            # torch's own per-sample-weights derivative of F.embedding_bag: one dot product
            # <grad_out[t], values[row]> per entry, without gathering the (T*H*k, d) rows.
            # Each entry's product stands alone, so the entries go in row order (the table
            # is then read in address order: 0.7x the time of token order at 16.7M rows)
            # and come back to token order bit for bit.
            sorted_rows, order = sort
            table, rows = values, sorted_rows
            if values.dtype in (torch.bfloat16, torch.float16):
                # the rows read in fp32, not a copy of the whole pool (the sparse gradient's pools are
                # the large ones); the entries are sorted already, so finding them costs one pass
                read, rows = torch.unique_consecutive(sorted_rows, return_inverse=True)
                table = values[read].float()
            by_row = torch.ops.aten._embedding_bag_per_sample_weights_backward(
                grad_out.to(table.dtype).contiguous(),
                table,
                rows,
                layout.offsets,
                tokens[order],
                0,
                -1,
            )
            grad_weights = torch.empty_like(by_row).index_copy_(0, order, by_row)
            grad_weights = grad_weights.reshape(weights.shape).to(weights.dtype)
        return grad_values, None, grad_weights


def embedding_bag_sparse(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The same bag as `embedding_bag`; its value gradient holds only the U rows read
    (a coalesced sparse COO tensor: unique rows ascending + their (U, d) gradient rows)."""
    return _SparseGradBag.apply(values, indices, weights)
