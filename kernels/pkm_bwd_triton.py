"""Backward of the fused product-key scoring in Triton, from the forward's saved indices
and fp32 softmax weights: gradients of the query (both halves) and of both half-key sets.

Forward recap (kernels/pkm_triton.py): slot = i1 * n + i2 and its score is
q1 . keys1[h, i1] + q2 . keys2[h, i2]; the k winners are softmaxed. With g the weights'
gradient, ds = w * (g - sum(g * w)) is the gradient of each winner's score, and it flows
to the half scores of its i1 and its i2.

Pass 1, one program per (BLOCK_T tokens, head):
  * ds in registers; per half, the k winners share few distinct half-key ids (on random
    data about a third of k), so, column by column, each row's ds of equal ids are summed
    into the id's first occurrence (k row compares of (BLOCK_T, k) tiles: no k x k tile);
  * dq_half = sum over distinct ids of their summed ds times the half-key row (a gather
    from the L2-resident key set), written once in the query's dtype;
  * per entry and half, the summed ds and a sort key (half*H + h)*n + id (or, for a
    repeated id, a sentinel past every real key) go to global memory for pass 2.
Between the passes, a stable sort of the 2*T*H*k sort keys (int16 when 2*H*n fits, so
two radix passes) and a binary search give each half-key row its segment of entries.
Pass 2, one program per chunk of at most KEY_CHUNK entries of a segment (one chunk for
almost every row; a hot half-key, chosen by much of a batch as in a trained memory, gets
several, so it does not become the tail of the launch): walks the chunk in sorted order,
BLOCK_E entries at a time, gathering the entries' query half-rows, into an fp32 partial
row. A last launch sums each row's chunks in chunk order and writes dkeys[row] once
(zeros for a row no token selected, so no fill). The grid is an upper bound on the
number of chunks known on the host: the backward never waits on the device.

No atomics and no (T, H, n) matrix: every output element is written by one program
after reductions in a fixed order, so repeated runs are bitwise identical. fp32
accumulation throughout; dq in the query's dtype, dkeys in the keys' dtype.

Bytes (paper shape, bf16): pass 1 reads w, g, indices (M*(4 + e + 8), M = T*H*k) and
writes dq (T*H*k_dim*e) plus 2*M*(4 + 4); key rows are gathered from L2. The sort moves
2*M keys and int64 positions a few times. Pass 2 gathers one query half-row per
distinct (token, head, id): about 0.37*2*M rows of k_dim/2*e bytes, and writes and
rereads 2*H*n (+ 2*M/KEY_CHUNK) fp32 partial rows. The PyTorch backward it
replaces (pkm_triton.pkm_topk_backward_torch) zero-fills, scatters into, casts and
multiplies two fp32 (T, H, n) matrices: 2*T*H*n*(4 + 4 + 2 + 2*2) bytes, about 3.7 GB.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_configs import pinned_autotune
from kernels.triton_common import INTERPRETING, next_pow2


@triton.jit
def _column(x, cols, j):
    """Column j of a (R, C) register tensor as (R,): the only non-zero term of a row sum."""
    return tl.sum(tl.where(cols[None, :] == j, x, tl.zeros_like(x)), axis=1)


@triton.jit
def _distinct_id(ids, ds, cols, j):
    """For column j of each row: its id, whether it is the id's first column, the ds of
    every column holding that id summed (the id's whole score gradient), as (R,) each.
    Padding columns hold id -1 and ds 0."""
    id_j = _column(ids, cols, j)
    same = ids == id_j[:, None]
    first = (tl.min(tl.where(same, cols[None, :], 2**30), axis=1) == j) & (id_j >= 0)
    return id_j, first, tl.sum(tl.where(same, ds, 0.0), axis=1)


@triton.jit
def _score_grad_rows_kernel(
    g_ptr,
    w_ptr,
    i_ptr,
    k1_ptr,
    k2_ptr,
    dq_ptr,
    ent_ds_ptr,
    ent_key_ptr,
    T,
    H,
    n_keys,
    half,
    M,
    stride_kh,
    stride_kn,
    K: tl.constexpr,
    KP: tl.constexpr,
    HALF_P: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    cols = tl.arange(0, KP)
    valid = tmask[:, None] & (cols < K)[None, :]
    entry = (toks[:, None].to(tl.int64) * H + h) * K + cols[None, :]
    w = tl.load(w_ptr + entry, mask=valid, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + entry, mask=valid, other=0.0).to(tl.float32)
    slot = tl.load(i_ptr + entry, mask=valid, other=0)
    ds = w * (g - tl.sum(g * w, axis=1)[:, None])
    i1 = tl.where(valid, (slot // n_keys).to(tl.int32), -1)
    i2 = tl.where(valid, (slot - (slot // n_keys) * n_keys).to(tl.int32), -1)
    sentinel = 2 * H * n_keys
    dims = tl.arange(0, HALF_P)
    dmask = dims < half
    base1 = k1_ptr + h * stride_kh + dims[None, :]
    base2 = k2_ptr + h * stride_kh + dims[None, :]
    acc1 = tl.zeros((BLOCK_T, HALF_P), tl.float32)
    acc2 = tl.zeros((BLOCK_T, HALF_P), tl.float32)
    ds1 = tl.zeros((BLOCK_T, KP), tl.float32)
    ds2 = tl.zeros((BLOCK_T, KP), tl.float32)
    key1 = tl.zeros((BLOCK_T, KP), tl.int32) + sentinel
    key2 = tl.zeros((BLOCK_T, KP), tl.int32) + sentinel
    # Column by column (a fixed order): each distinct id's summed ds, one gathered key row per
    # distinct id for dq, and the per-entry sort keys and ds for pass 2 (at first occurrences).
    for j in range(K):
        id1, first1, sum1 = _distinct_id(i1, ds, cols, j)
        id2, first2, sum2 = _distinct_id(i2, ds, cols, j)
        row1 = tl.load(
            base1 + id1[:, None].to(tl.int64) * stride_kn, mask=first1[:, None] & dmask[None, :], other=0.0
        ).to(tl.float32)
        row2 = tl.load(
            base2 + id2[:, None].to(tl.int64) * stride_kn, mask=first2[:, None] & dmask[None, :], other=0.0
        ).to(tl.float32)
        acc1 += tl.where(first1, sum1, 0.0)[:, None] * row1
        acc2 += tl.where(first2, sum2, 0.0)[:, None] * row2
        at_j = cols[None, :] == j
        ds1 = tl.where(at_j & first1[:, None], sum1[:, None], ds1)
        ds2 = tl.where(at_j & first2[:, None], sum2[:, None], ds2)
        key1 = tl.where(at_j & first1[:, None], (h * n_keys + id1)[:, None], key1)
        key2 = tl.where(at_j & first2[:, None], ((H + h) * n_keys + id2)[:, None], key2)
    tl.store(ent_ds_ptr + entry, ds1, mask=valid)
    tl.store(ent_ds_ptr + M + entry, ds2, mask=valid)
    tl.store(ent_key_ptr + entry, key1, mask=valid)
    tl.store(ent_key_ptr + M + entry, key2, mask=valid)
    out = dq_ptr + (toks[:, None].to(tl.int64) * H + h) * (2 * half) + dims[None, :]
    omask = tmask[:, None] & dmask[None, :]
    tl.store(out, acc1.to(dq_ptr.dtype.element_ty), mask=omask)
    tl.store(out + half, acc2.to(dq_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _key_grad_kernel(
    q_ptr,
    perm_ptr,
    seg_ptr,
    first_ptr,
    key_of_ptr,
    ent_ds_ptr,
    parts_ptr,
    H,
    n_keys,
    half,
    M,
    CHUNK,
    K: tl.constexpr,
    HALF_P: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Program u reduces chunk u (the (u - first[key])-th run of CHUNK entries of its key's
    sorted segment) into the fp32 row parts[u]. Programs past the last chunk find an
    empty range and write a row nobody reads."""
    u = tl.program_id(0)
    key = tl.load(key_of_ptr + u)  # half-key row (a*H + h)*n + i
    a = key // (H * n_keys)  # which half: its query columns
    start = tl.load(seg_ptr + key) + (u - tl.load(first_ptr + key)) * CHUNK
    end = tl.minimum(start + CHUNK, tl.load(seg_ptr + key + 1))
    dims = tl.arange(0, HALF_P)
    dmask = dims < half
    acc = tl.zeros((HALF_P,), tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        emask = es < end
        entry = tl.load(perm_ptr + es, mask=emask, other=0)
        ds = tl.load(ent_ds_ptr + entry, mask=emask, other=0.0)
        token_head = (entry - a * M) // K  # t*H + h: the query row, contiguous (T, H, 2*half)
        q = tl.load(
            q_ptr + token_head[:, None] * (2 * half) + a * half + dims[None, :],
            mask=emask[:, None] & dmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(ds[:, None] * q, axis=0)
    tl.store(parts_ptr + u.to(tl.int64) * half + dims, acc, mask=dmask)


@triton.jit
def _sum_chunks_kernel(parts_ptr, first_ptr, n_chunks_ptr, out_ptr, half, HALF_P: tl.constexpr):
    """out[key] = its chunks' partial rows summed in chunk order (one chunk for most keys)."""
    key = tl.program_id(0)
    first = tl.load(first_ptr + key)
    dims = tl.arange(0, HALF_P)
    dmask = dims < half
    acc = tl.zeros((HALF_P,), tl.float32)
    for c in range(first, first + tl.load(n_chunks_ptr + key)):
        acc += tl.load(parts_ptr + c * half + dims, mask=dmask, other=0.0)  # c is int64 (first is)
    tl.store(out_ptr + key.to(tl.int64) * half + dims, acc.to(out_ptr.dtype.element_ty), mask=dmask)


if INTERPRETING:  # one fixed configuration; the interpreter cannot autotune over several
    _score_grad_rows, _key_grad, _sum_chunks = _score_grad_rows_kernel, _key_grad_kernel, _sum_chunks_kernel
else:
    # Pass 1 holds two (BLOCK_T, half) fp32 accumulators and a few (BLOCK_T, k) tiles.
    # Pass 2 gathers BLOCK_E query half-rows per step; segments average ~0.37*T*k/n entries.
    _score_grad_rows = pinned_autotune(
        "pkm_bwd_rows",
        [triton.Config({"BLOCK_T": t}, num_warps=w) for t, w in ((4, 2), (8, 2), (8, 4), (16, 8), (32, 8))],
        key=["n_keys", "K", "HALF_P"],
    )(_score_grad_rows_kernel)
    _key_grad = pinned_autotune(
        "pkm_bwd_keys",
        [triton.Config({"BLOCK_E": e}, num_warps=w) for e, w in ((8, 2), (16, 4), (32, 4), (64, 8))],
        key=["n_keys", "K", "HALF_P"],
    )(_key_grad_kernel)
    _sum_chunks = pinned_autotune("pkm_bwd_sum_chunks", [triton.Config({}, num_warps=1)], key=["HALF_P"])(
        _sum_chunks_kernel
    )


def _sort_dtype(num_keys: int) -> torch.dtype:
    """int16 radix keys (two passes) when the key range fits, else int32."""
    return torch.int16 if num_keys < 2**15 else torch.int32


def score_backward(
    grad_weights: torch.Tensor,
    query: torch.Tensor,
    keys1: torch.Tensor,
    keys2: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
):
    """(dquery, dkeys1, dkeys2) of the softmax weights from the saved fp32 weights and indices.

    query (T, H, 2*half); keys (H, n, half); weights/indices/grad_weights (T, H, k).
    """
    T, H, k = indices.shape
    n_keys, half = keys1.shape[1], keys1.shape[2]
    dev = query.device
    query = query.contiguous()
    kdtype = query.dtype  # the forward multiplied the keys in the query's dtype
    k1, k2 = keys1.to(kdtype).contiguous(), keys2.to(kdtype).contiguous()
    dq = torch.empty(T, H, 2 * half, dtype=query.dtype, device=dev)
    dk = torch.empty(2, H, n_keys, half, dtype=torch.promote_types(keys1.dtype, keys2.dtype), device=dev)
    if T == 0:
        dk.zero_()
        return dq, dk[0].to(keys1.dtype), dk[1].to(keys2.dtype)
    M = T * H * k
    ent_ds = torch.empty(2 * M, dtype=torch.float32, device=dev)
    num_keys = 2 * H * n_keys  # sort keys 0..num_keys-1; num_keys marks a repeated id
    ent_key = torch.empty(2 * M, dtype=torch.int32, device=dev)
    consts = dict(K=k, HALF_P=max(16, next_pow2(half)))
    args = (
        grad_weights.contiguous(),
        weights.contiguous(),
        indices.contiguous(),
        k1,
        k2,
        dq,
        ent_ds,
        ent_key,
        T,
        H,
        n_keys,
        half,
        M,
        k1.stride(0),
        k1.stride(1),
    )
    if INTERPRETING:
        _score_grad_rows[(triton.cdiv(T, 16), H)](*args, KP=max(8, next_pow2(k)), BLOCK_T=16, **consts)
    else:
        _score_grad_rows[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), H)](*args, KP=max(8, next_pow2(k)), **consts)
    sorted_keys, perm = torch.sort(ent_key.to(_sort_dtype(num_keys + 1)), stable=True)
    # Segment offsets by binary search (no bincount: its output size needs a device sync).
    seg = torch.searchsorted(sorted_keys, torch.arange(num_keys + 1, device=dev, dtype=sorted_keys.dtype))
    # Every key row is cut into chunks of at most KEY_CHUNK entries (at least one chunk,
    # so untouched rows are written as zeros). The grid is an upper bound on the number
    # of chunks known on the host: no device sync anywhere in the backward.
    chunk = KEY_CHUNK
    n_chunks = torch.clamp_min((seg[1:] - seg[:-1] + chunk - 1) // chunk, 1)
    chunk_ends = torch.cumsum(n_chunks, 0)
    first = chunk_ends - n_chunks
    bound = num_keys + triton.cdiv(2 * M, chunk)
    key_of = torch.searchsorted(chunk_ends, torch.arange(bound, device=dev), right=True).clamp_max_(num_keys - 1)
    parts = torch.empty(bound, half, dtype=torch.float32, device=dev)
    kargs = (query, perm, seg, first, key_of, ent_ds, parts, H, n_keys, half, M, chunk)
    if INTERPRETING:
        _key_grad[(bound,)](*kargs, BLOCK_E=8, **consts)
    else:
        _key_grad[(bound,)](*kargs, **consts)
    _sum_chunks[(num_keys,)](parts, first, n_chunks, dk, half, HALF_P=consts["HALF_P"])
    return dq, dk[0].to(keys1.dtype), dk[1].to(keys2.dtype)


# The most entries one program of pass 2 reduces. A half-key chosen by much of a batch
# (a hot key of a trained memory) is cut into chunks whose fp32 partial rows are summed
# in order, so one key never makes the tail of the launch.
KEY_CHUNK = 2048
