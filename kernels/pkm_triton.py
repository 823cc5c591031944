"""Fused product-key search in Triton: half-key scores, top-k per half, the candidate
sums, the final top-k and the softmax, in one kernel.

Shapes (see kernels/reference.py): query (T, H, k_dim); keys1/keys2 (H, n, k_dim // 2);
returns weights (T, H, k) in the query's dtype and int64 indices (T, H, k), i1 * n + i2.

Design (forward, one program per (block of BLOCK_T tokens, head)):
  * The program loads its BLOCK_T half-queries once and streams the head's half-keys
    in tiles of BLOCK_N rows; each tile is scored with `tl.dot` (fp32 accumulation;
    fp32 inputs use IEEE precision so results match the reference to ~1e-6).
  * Each score is packed with its key index into one int64 (order-preserving float
    bits in the high word, the bit-inverted index in the low word), so a plain row
    max carries the argument along and keys are unique (ties go to the lower index).
  * Per half, the running top-k (unordered, KP register columns, KP = next power of
    two of k) is merged with each tile by threshold: only tile scores above the
    running k-th best can enter, so a tile costs as many rounds (row max, knock-out,
    replace the row minimum) as the most such scores in any row of the block, at most
    k. On random data that is k for the first tile and about k/j + a few for the j-th:
    roughly half the rounds of merging every tile in full.
  * Candidates: with both halves sorted (descending), a pair (a, b) can only be in
    the top k of the sums v1[a] + v2[b] if (a+1)(b+1) <= k (the (a+1)(b+1) - 1 pairs
    that dominate it are at least as large). That is ~k ln k pairs (119 for k=32)
    instead of k*k (1024); the host passes their (a, b) list and the kernel gathers
    them (`tl.gather`), packs sum and slot id i1 * n + i2, and extracts the top k in
    order. The softmax over the k winners runs in registers.
  Selection is always k rounds of row-max + knock-out (never Triton's bitonic
  `tl.topk`/`tl.sort`, whose xor-reductions run element by element in the
  interpreter and made CPU testing impractical). Nothing of size N = n*n or k*k per
  token touches global memory.

Bytes moved (forward, the model the benchmark counts): query T*H*k_dim*e, keys
2*H*n*(k_dim/2)*e (each read once), weights T*H*k*e and indices T*H*k*8 written
(e = element size). FLOPs: 2*T*H*n*k_dim (two half-key matmuls). The kernel rereads
keys once per token block (from L2), which this model does not count.

Backward: kernels/pkm_bwd_triton.py (Triton, deterministic, from the saved indices
and fp32 weights). `pkm_topk_backward_torch` keeps the earlier PyTorch backward (an fp32
scatter into dense (T, H, n) matrices, then matmuls in the inputs' dtype) as the
benchmark's comparison; its `scatter_add_` uses float atomics on CUDA.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from kernels import pkm_bwd_triton, reference
from kernels.launch_configs import pinned_autotune
from kernels.triton_common import INTERPRETING, check_same_device, next_pow2

_LOW_MAX = tl.constexpr(2147483647)  # low word = _LOW_MAX - index: larger for lower indices
_TOP = tl.constexpr(9223372036854775807)  # above every packed key: padding columns of the running top-k


@triton.jit
def _pack(score, index):
    """int64 key ordered like `score` (fp32), ties broken toward the lower index."""
    bits = score.to(tl.int32, bitcast=True)
    ordered = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) + (index.to(tl.int64) * -1 + _LOW_MAX)


@triton.jit
def _unpack(key):
    hi = (key >> 32).to(tl.int32)
    bits = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF)
    low = key - ((key >> 32) << 32)
    return bits.to(tl.float32, bitcast=True), low * -1 + _LOW_MAX


@triton.jit
def _neg_key():
    """The smallest key: -inf with the largest index. Knocked-out entries become this."""
    return _pack(tl.full((1, 1), float("-inf"), tl.float32), tl.full((1, 1), _LOW_MAX, tl.int64))


@triton.jit
def _extract_topk(a, K: tl.constexpr, KP: tl.constexpr):
    """Top K of the packed keys a (R, A), largest first, as (R, KP).

    K rounds of row max + knock-out. Keys are unique (they carry their index), so
    `== m` removes exactly the extracted key. Columns K..KP-1 hold the smallest key.
    """
    neg = _neg_key()
    cols = tl.arange(0, KP)[None, :]
    out = tl.zeros((a.shape[0], KP), tl.int64) + neg
    for j in range(K):
        m = tl.max(a, axis=1)[:, None]
        out = tl.where(cols == j, m, out)
        a = tl.where(a == m, neg, a)
    return out


@triton.jit
def _half_topk(
    q,
    keys_ptr,
    n_keys,
    half,
    stride_kn,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HALF_P: tl.constexpr,
    K: tl.constexpr,
    KP: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Packed top-K keys (BLOCK_T, KP), descending, of q (BLOCK_T, HALF_P) against one head's half-keys."""
    dims = tl.arange(0, HALF_P)
    dmask = dims < half
    cols = tl.arange(0, KP)[None, :]
    neg = _neg_key()
    # Running top-K, unordered. Real columns start at distinct sentinels just above `neg`
    # (low words past _LOW_MAX) so "replace the row minimum" replaces exactly one;
    # padding columns hold _TOP so they are never the minimum.
    sentinels = _pack(tl.full((BLOCK_T, KP), float("-inf"), tl.float32), -1 - cols + tl.zeros((BLOCK_T, KP), tl.int32))
    best = tl.where(cols < K, sentinels, _TOP)
    for n0 in range(0, n_keys, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nmask = ns < n_keys
        kt = tl.load(
            keys_ptr + dims[:, None] + ns[None, :].to(tl.int64) * stride_kn,
            mask=dmask[:, None] & nmask[None, :],
            other=0.0,
        )
        if IEEE:
            s = tl.dot(q.to(tl.float32), kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = tl.where(nmask[None, :], s, float("-inf"))
        tile = _pack(s, ns[None, :] + tl.zeros((BLOCK_T, BLOCK_N), tl.int32))
        threshold = tl.min(best, axis=1)[:, None]
        above = tile > threshold
        tile = tl.where(above, tile, neg)
        # Tile keys enter in descending order; after K rounds none can enter any more.
        rounds = tl.minimum(tl.max(tl.sum(above.to(tl.int32), axis=1)), K)
        for _ in range(rounds):
            m = tl.max(tile, axis=1)[:, None]
            tile = tl.where(tile == m, neg, tile)
            low = tl.min(best, axis=1)[:, None]
            best = tl.where((best == low) & (m > low), m, best)
    return _extract_topk(tl.where(cols < K, best, neg), K, KP)


@triton.jit
def _pkm_fwd_kernel(
    q_ptr,
    k1_ptr,
    k2_ptr,
    pairs_ptr,
    w_ptr,
    i_ptr,
    T,
    H,
    n_keys,
    half,
    stride_qt,
    stride_qh,
    stride_kh,
    stride_kn,
    K: tl.constexpr,
    KP: tl.constexpr,
    P: tl.constexpr,
    HALF_P: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    dims = tl.arange(0, HALF_P)
    qmask = tmask[:, None] & (dims < half)[None, :]
    q_base = q_ptr + toks[:, None].to(tl.int64) * stride_qt + h * stride_qh + dims[None, :]
    q1 = tl.load(q_base, mask=qmask, other=0.0)
    q2 = tl.load(q_base + half, mask=qmask, other=0.0)
    best1 = _half_topk(q1, k1_ptr + h * stride_kh, n_keys, half, stride_kn, BLOCK_T, BLOCK_N, HALF_P, K, KP, IEEE)
    best2 = _half_topk(q2, k2_ptr + h * stride_kh, n_keys, half, stride_kn, BLOCK_T, BLOCK_N, HALF_P, K, KP, IEEE)
    v1, j1 = _unpack(best1)
    v2, j2 = _unpack(best2)
    # The candidate pairs (a, b) with (a+1)(b+1) <= K; padding entries have a = -1.
    pa = tl.load(pairs_ptr + tl.arange(0, P))
    pb = tl.load(pairs_ptr + P + tl.arange(0, P))
    ia = tl.zeros((BLOCK_T, P), tl.int32) + tl.maximum(pa, 0)[None, :]
    ib = tl.zeros((BLOCK_T, P), tl.int32) + tl.maximum(pb, 0)[None, :]
    cand = tl.where((pa >= 0)[None, :], tl.gather(v1, ia, axis=1) + tl.gather(v2, ib, axis=1), float("-inf"))
    slot = tl.gather(j1, ia, axis=1) * n_keys + tl.gather(j2, ib, axis=1)
    score, slot = _unpack(_extract_topk(_pack(cand, slot), K, KP))
    cols = tl.arange(0, KP)
    valid = cols[None, :] < K
    score = tl.where(valid, score, float("-inf"))
    e = tl.exp(score - tl.max(score, axis=1)[:, None])
    e = tl.where(valid, e, 0.0)
    w = e / tl.sum(e, axis=1)[:, None]
    out = toks[:, None].to(tl.int64) * (H * K) + h * K + cols[None, :]
    omask = tmask[:, None] & valid
    tl.store(w_ptr + out, w.to(w_ptr.dtype.element_ty), mask=omask)
    tl.store(i_ptr + out, slot, mask=omask)


@functools.lru_cache(maxsize=None)
def _candidate_pairs(k: int, device: torch.device) -> torch.Tensor:
    """int32 (2, P): the reference's (a, b) pairs with (a+1)(b+1) <= k, padded with a = b = -1
    to a power of two."""
    a, b = reference.candidate_pairs(k, torch.device("cpu"))
    table = torch.full((2, max(16, next_pow2(a.numel()))), -1, dtype=torch.int32)
    table[0, : a.numel()], table[1, : b.numel()] = a, b
    return table.to(device)


def _prune_launches(configs, named_args, **kwargs):
    """Drop key tiles much wider than the key set (all-masked columns are pure waste)."""
    cap = max(16, next_pow2(named_args["n_keys"]))
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= cap]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


# (BLOCK_T, BLOCK_N, num_warps). tl.dot needs M, N, K >= 16 when compiled. Measured on an
# H100 at the paper's shape (tools/bench_kernels.py --scoring-configs): few warps and
# narrow key tiles win, because each merge round is a chain of short row reductions.
LAUNCHES = [(16, 64, 2), (16, 32, 2), (16, 128, 2), (16, 32, 1), (16, 64, 4), (32, 64, 4), (16, 16, 1)]
if INTERPRETING:  # one fixed configuration; the interpreter cannot autotune over several
    _pkm_fwd = _pkm_fwd_kernel
else:
    _pkm_fwd = pinned_autotune(
        "pkm_fwd",
        [triton.Config({"BLOCK_T": t, "BLOCK_N": n}, num_warps=w) for t, n, w in LAUNCHES],
        key=["n_keys", "K", "HALF_P", "IEEE"],
        prune=_prune_launches,
    )(_pkm_fwd_kernel)


def pkm_topk_forward(
    query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int, launch: tuple[int, int, int] | None = None
):
    """Kernel launch without autograd: fp32 weights (T, H, k) and int64 indices.

    Compiled, the launch configuration is autotuned over LAUNCHES (once per key-set
    shape); `launch` = (BLOCK_T, BLOCK_N, num_warps) forces one instead
    (tools/bench_kernels.py --scoring-configs times each).

    Weights stay fp32 here (the backward needs them at full precision, as the
    reference's autograd keeps its fp32 softmax); `pkm_topk` casts the output.
    """
    check_same_device(query=query, keys1=keys1, keys2=keys2)
    T, H, k_dim = query.shape
    n_keys, half = keys1.shape[1], keys1.shape[2]
    if k_dim != 2 * half or keys1.shape != keys2.shape or keys1.shape[0] != H:
        raise ValueError(
            f"shapes query {tuple(query.shape)}, keys1 {tuple(keys1.shape)}, keys2 {tuple(keys2.shape)} "
            "do not match (T, H, 2*half) / (H, n_keys, half)"
        )
    if not 0 < k <= n_keys:
        raise ValueError(f"k={k} must be in 1..n_keys={n_keys} (config key memory.k)")
    if n_keys * n_keys >= 2**31:
        raise ValueError(f"n_keys={n_keys} gives more than 2**31 slots; the packed top-k keys hold 31-bit slot ids")
    query = query.contiguous()
    keys1, keys2 = keys1.to(query.dtype).contiguous(), keys2.to(query.dtype).contiguous()
    weights = torch.empty(T, H, k, dtype=torch.float32, device=query.device)
    indices = torch.empty(T, H, k, dtype=torch.int64, device=query.device)
    if T == 0:
        return weights, indices
    # At least 8 columns: Triton 3.6 fails to compile (an assertion in its gather
    # lowering) when the gathered running top-k is only 4 wide.
    kp = max(8, next_pow2(k))
    pairs = _candidate_pairs(k, query.device)
    args = (
        query,
        keys1,
        keys2,
        pairs,
        weights,
        indices,
        T,
        H,
        n_keys,
        half,
        query.stride(0),
        query.stride(1),
        keys1.stride(0),
        keys1.stride(1),
    )
    consts = dict(
        K=k,
        KP=kp,
        P=pairs.shape[1],
        HALF_P=max(16, next_pow2(half)),
        # The interpreter's tl.dot multiplies bf16/fp16 bit patterns as integers: upcast there.
        IEEE=query.dtype == torch.float32 or INTERPRETING,
    )
    if INTERPRETING and launch is None:
        launch = (16, max(16, min(128, next_pow2(n_keys))), 4)
    if launch is not None:
        block_t, block_n, warps = launch
        _pkm_fwd_kernel[(triton.cdiv(T, block_t), H)](
            *args, **consts, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=warps
        )
    else:
        _pkm_fwd[lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), H)](*args, **consts)
    return weights, indices


def pkm_topk_backward(grad_weights, query, keys1, keys2, weights, indices):
    """Gradients (dquery, dkeys1, dkeys2) of the softmax weights, from saved indices (Triton)."""
    return pkm_bwd_triton.score_backward(grad_weights, query, keys1, keys2, weights, indices)


def pkm_topk_backward_torch(grad_weights, query, keys1, keys2, weights, indices):
    """The same gradients in PyTorch: fp32 scatter into (T, H, n), then matmuls (the benchmark's baseline)."""
    n_keys, half = keys1.shape[1], keys1.shape[2]
    w = weights.float()
    g = grad_weights.float()
    ds = w * (g - (g * w).sum(-1, keepdim=True))
    T, H, _ = w.shape
    dense1 = torch.zeros(T, H, n_keys, dtype=torch.float32, device=w.device)
    dense2 = torch.zeros_like(dense1)
    dense1.scatter_add_(2, indices // n_keys, ds)
    dense2.scatter_add_(2, indices % n_keys, ds)
    # Accumulate the scatter in fp32, multiply in the inputs' dtype (fp32 stays fp32).
    dtype = torch.promote_types(query.dtype, keys1.dtype)
    dense1, dense2 = dense1.to(dtype), dense2.to(dtype)
    q1, q2 = query[..., :half].to(dtype), query[..., half:].to(dtype)
    dq = torch.cat(
        [torch.einsum("thn,hnd->thd", dense1, keys1.to(dtype)), torch.einsum("thn,hnd->thd", dense2, keys2.to(dtype))],
        dim=-1,
    )
    dk1 = torch.einsum("thn,thd->hnd", dense1, q1)
    dk2 = torch.einsum("thn,thd->hnd", dense2, q2)
    return dq.to(query.dtype), dk1.to(keys1.dtype), dk2.to(keys2.dtype)


class PKMTopK(torch.autograd.Function):
    """Autograd wrapper: Triton forward, Triton backward on the saved indices."""

    @staticmethod
    def forward(ctx, query, keys1, keys2, k):
        weights, indices = pkm_topk_forward(query, keys1, keys2, k)
        ctx.save_for_backward(query, keys1, keys2, weights, indices)
        ctx.mark_non_differentiable(indices)
        return weights.to(query.dtype), indices

    @staticmethod
    def backward(ctx, grad_weights, grad_indices):
        query, keys1, keys2, weights, indices = ctx.saved_tensors
        dq, dk1, dk2 = pkm_topk_backward(grad_weights, query, keys1, keys2, weights, indices)
        return (
            dq if ctx.needs_input_grad[0] else None,
            dk1 if ctx.needs_input_grad[1] else None,
            dk2 if ctx.needs_input_grad[2] else None,
            None,
        )


def pkm_topk(query: torch.Tensor, keys1: torch.Tensor, keys2: torch.Tensor, k: int):
    """Differentiable fused product-key top-k: weights (T, H, k), indices (T, H, k)."""
    return PKMTopK.apply(query, keys1, keys2, k)
