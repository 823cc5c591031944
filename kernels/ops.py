"""The memory kernels as `torch.library` custom ops: one opaque op per lookup step.

`torch.compile` cannot trace into a Triton launch wrapped in an `autograd.Function`
nor through the reference's data-dependent top-k without breaking the graph at every
memory layer. Registered as custom ops with fake (meta) implementations and autograd
formulas, each lookup is one node that dynamo/inductor keep whole:

  memlayers::pkm_topk            (query, keys1, keys2, k, backend) -> (fp32 weights, indices)
  memlayers::pkm_topk_backward   -> (dquery, dkeys1, dkeys2)
  memlayers::embedding_bag       (values, indices, weights, backend, value_grad, check_indices) -> (T, d)
  memlayers::embedding_bag_backward -> (dvalues, dweights)

The forward ops call the public dispatch in `kernels` (Triton on CUDA, the reference
otherwise), so they follow whatever the kernel modules do. The backward ops are ops too
(so AOTAutograd can trace the backward graph around them):
  * Triton backend: the Triton modules' own backward functions on the saved tensors.
  * torch backend: the scoring's closed-form gradient on the saved indices (a gather of
    the selected half-key rows), checked against the reference's autograd in float64;
    the bag's backward is the aten kernels the reference's autograd calls (bitwise).
`value_grad="sparse"` (a sparse COO gradient whose size depends on the data) has no
fake implementation; it keeps the plain `kernels.embedding_bag` path.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

import kernels
from kernels.reference import BagLayout, bag_layout, fp32_rows_read, score_chunk_rows

# ------------------------------------------------------------------ PyTorch backward formulas
# The half-key gradients scattered into dense (heads, tokens, n_keys) score gradients and
# multiplied, rather than summed per key row, while n_keys is at most this many times k: at the
# demo's shape (n_keys 128, k 16, 2048 tokens) 3.7x faster on CPU, at 512 keys and k 32 2.1x, at
# 1024 keys and k 32 1.05x slower (tools/bench_cpu_paths.py times both).
# CPU only: on an accelerator the dense scatter would add with atomics (gradients no longer
# bitwise reproducible), and there the sparse path was measured as it is.
DENSE_KEY_GRAD_MAX_KEYS_PER_K = 16


def use_dense_half_key_grads(n_keys: int, k: int, device: torch.device) -> bool:
    """Whether `_pkm_topk_backward_gathered` takes the dense formulation for this shape and device."""
    return torch.device(device).type == "cpu" and n_keys <= DENSE_KEY_GRAD_MAX_KEYS_PER_K * k


def _pkm_topk_backward_gathered(grad_weights, query, keys1, keys2, weights, indices):
    """d(softmax weights)/d(query, keys) through the selected half-key rows only.

    score_j = q1 . keys1[h, i1_j] + q2 . keys2[h, i2_j] (i1 = index // n, i2 = index % n);
    the softmax backward gives d score, and per half d q_half and d keys_half are the
    selected rows' sums weighted by d score. Two formulations of the same sums (they differ
    in fp32 rounding only): `_half_key_grads_dense` on CPU for few keys per selected slot
    (`use_dense_half_key_grads`), `_half_key_grads_sparse` otherwise.
    """
    H, n, half = keys1.shape
    T, _, k = indices.shape
    acc = torch.promote_types(query.dtype, torch.float32)
    w, g = weights.to(acc), grad_weights.to(acc)
    dscore = w * (g - (g * w).sum(-1, keepdim=True))  # (T, H, k)
    halves = ((query[..., :half], keys1, indices // n), (query[..., half:], keys2, indices % n))
    grad_fn = _half_key_grads_dense if use_dense_half_key_grads(n, k, query.device) else _half_key_grads_sparse
    (dq1, dk1), (dq2, dk2) = (grad_fn(part.to(acc), keys.to(acc), rows, dscore) for part, keys, rows in halves)
    return torch.cat([dq1, dq2], dim=-1).to(query.dtype), dk1.to(keys1.dtype), dk2.to(keys2.dtype)


def _half_key_grads_sparse(part: Tensor, keys: Tensor, rows: Tensor, dscore: Tensor):
    """(d part (T, H, half), d keys (H, n, half)) for part (T, H, half) = one half of the query,
    keys (H, n, half), rows (T, H, k) the selected half-key rows and dscore (T, H, k).

    With the H half-key sets as one (H*n, half) table and one bag of k rows per (token, head):
    d part is that bag weighted by d score, and d keys is the same bag's table gradient for
    an output gradient of part. Both run as torch's embedding-bag kernels, so no (T, H, k,
    half) gather or product exists (at n = 4096 those temporaries cost more than the rest of
    the backward)."""
    (H, n, half), (T, _, k) = keys.shape, rows.shape
    layout = bag_layout(T * H, k, part.device)
    flat_rows = (rows + (torch.arange(H, device=part.device) * n)[None, :, None]).reshape(-1)
    flat_dscore = dscore.reshape(-1)
    dpart = F.embedding_bag(
        flat_rows, keys.reshape(H * n, half), layout.offsets, per_sample_weights=flat_dscore, mode="sum"
    )
    dkeys = _bag_table_grad(part.reshape(T * H, half), flat_rows, layout, H * n, flat_dscore)
    return dpart.reshape(T, H, half), dkeys.reshape(H, n, half)


def _half_key_grads_dense(part: Tensor, keys: Tensor, rows: Tensor, dscore: Tensor):
    """`_half_key_grads_sparse`'s gradients through the dense score gradient D (H, tokens, n):
    D[h, t, r] = the sum of t's d scores at half-key row r, then d part = D @ keys and
    d keys = D^T @ part, per head. The torch sort and per-row accumulation of the sparse
    path's table gradient cost more than these matmuls while n is a few times k. Tokens go
    in chunks (`kernels.reference.score_chunk_rows`) so that D stays cache-sized on CPU."""
    (H, n, half), T = keys.shape, part.shape[0]
    dparts = []
    dkeys = torch.zeros(H, n, half, dtype=part.dtype, device=part.device)
    by_head_part, by_head_rows, by_head_dscore = (t.transpose(0, 1) for t in (part, rows, dscore))
    chunk = score_chunk_rows(part.device, H, n)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        scores = torch.zeros(H, t1 - t0, n, dtype=part.dtype, device=part.device)
        scores.scatter_add_(2, by_head_rows[:, t0:t1], by_head_dscore[:, t0:t1])
        dparts.append(torch.bmm(scores, keys))
        dkeys.baddbmm_(scores.transpose(1, 2), by_head_part[:, t0:t1])
    dpart = torch.cat(dparts, dim=1) if dparts else part.new_zeros(H, 0, half)
    return dpart.transpose(0, 1), dkeys


def _bag_table_grad(grad_bags: Tensor, flat_rows: Tensor, layout: BagLayout, n_rows: int, entry_weights: Tensor):
    """d table of a weighted sum bag for the bags' output gradient: the dense (n_rows, d) kernel
    F.embedding_bag's autograd calls (sorted accumulation on CPU, no (entries, d) temporary)."""
    return torch.ops.aten._embedding_bag_backward(
        grad_bags,
        flat_rows,
        layout.offsets,
        layout.offset2bag,
        layout.bag_size,
        torch.zeros(grad_bags.shape, dtype=torch.int64, device=grad_bags.device),  # max indices: unused by "sum"
        n_rows,
        False,
        0,
        False,
        entry_weights,
        -1,
    )


def _embedding_bag_backward_aten(grad_out, values, indices, weights, need_values, need_weights):
    """The reference bag's backward: the aten kernels F.embedding_bag's autograd calls, fed the
    bag layout of a 2-D input (T bags of H*k rows), so the gradients are the reference's bit
    for bit and no (T, H*k, d) gather is materialised."""
    T = indices.shape[0]
    flat = indices.reshape(-1)
    per_bag = flat.numel() // T if T else 0
    acc = torch.float32 if values.dtype in (torch.bfloat16, torch.float16) else values.dtype  # as the reference
    g = grad_out.to(acc)
    layout = bag_layout(T, per_bag, values.device)
    dv = dw = None
    if need_values:
        dv = _bag_table_grad(g, flat, layout, values.shape[0], weights.reshape(-1).to(acc)).to(values.dtype)
    if need_weights:
        # the rows read in acc, not a copy of the whole pool (a bf16 pool of 1M slots: ~0.8 s a step)
        table, rows = fp32_rows_read(values, flat)
        dw = (
            torch.ops.aten._embedding_bag_per_sample_weights_backward(
                g, table.to(acc), rows, layout.offsets, layout.offset2bag, 0, -1
            )
            .reshape(weights.shape)
            .to(weights.dtype)
        )
    return dv, dw


# ------------------------------------------------------------------ product-key top-k
@torch.library.custom_op("memlayers::pkm_topk", mutates_args=())
def _pkm_topk(query: Tensor, keys1: Tensor, keys2: Tensor, k: int, backend: str) -> tuple[Tensor, Tensor]:
    """Weights at least fp32 (`kernels.pkm_topk_fp32`): the backward needs them unrounded;
    `pkm_topk` below casts them to the query's dtype outside the op."""
    weights, indices = kernels.pkm_topk_fp32(query, keys1, keys2, k, backend=backend)
    return weights, indices


@_pkm_topk.register_fake
def _pkm_topk_fake(query, keys1, keys2, k, backend):
    T, H = query.shape[0], query.shape[1]
    acc = torch.promote_types(query.dtype, torch.float32)
    return query.new_empty(T, H, k, dtype=acc), query.new_empty(T, H, k, dtype=torch.int64)


@torch.library.custom_op("memlayers::pkm_topk_backward", mutates_args=())
def _pkm_topk_backward(
    grad_weights: Tensor,
    query: Tensor,
    keys1: Tensor,
    keys2: Tensor,
    weights: Tensor,
    indices: Tensor,
    k: int,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    if kernels.resolve_backend(backend, query) == "triton":
        from kernels import pkm_triton

        dq, dk1, dk2 = pkm_triton.pkm_topk_backward(grad_weights, query, keys1, keys2, weights, indices)
        # The Triton backward writes both half-key gradients into one buffer; a custom op's
        # outputs may not alias each other (the copy is H * n * half elements, small).
        if dk2.untyped_storage().data_ptr() == dk1.untyped_storage().data_ptr():
            dk2 = dk2.clone()
        return dq, dk1, dk2
    return _pkm_topk_backward_gathered(grad_weights, query, keys1, keys2, weights, indices)


@_pkm_topk_backward.register_fake
def _pkm_topk_backward_fake(grad_weights, query, keys1, keys2, weights, indices, k, backend):
    # contiguous, as both backends return them (empty_like would copy a view's strides)
    return query.new_empty(query.shape), keys1.new_empty(keys1.shape), keys2.new_empty(keys2.shape)


def _pkm_setup(ctx, inputs, output):
    query, keys1, keys2, k, backend = inputs
    weights, indices = output
    ctx.save_for_backward(query, keys1, keys2, weights, indices)
    ctx.k, ctx.backend = k, backend


def _pkm_backward(ctx, grad_weights, grad_indices):
    query, keys1, keys2, weights, indices = ctx.saved_tensors
    if grad_weights is None:
        grad_weights = torch.zeros_like(weights)
    dq, dk1, dk2 = _pkm_topk_backward(grad_weights, query, keys1, keys2, weights, indices, ctx.k, ctx.backend)
    return dq, dk1, dk2, None, None


_pkm_topk.register_autograd(_pkm_backward, setup_context=_pkm_setup)


# ------------------------------------------------------------------ weighted embedding bag
@torch.library.custom_op("memlayers::embedding_bag", mutates_args=())
def _embedding_bag(
    values: Tensor, indices: Tensor, weights: Tensor, backend: str, value_grad: str, check_indices: bool
) -> Tensor:
    return kernels.embedding_bag(
        values, indices, weights, backend=backend, value_grad=value_grad, check_indices=check_indices
    )


@_embedding_bag.register_fake
def _embedding_bag_fake(values, indices, weights, backend, value_grad, check_indices):
    return values.new_empty(indices.shape[0], values.shape[1])


@torch.library.custom_op("memlayers::embedding_bag_backward", mutates_args=())
def _embedding_bag_backward(
    grad_out: Tensor,
    values: Tensor,
    indices: Tensor,
    weights: Tensor,
    backend: str,
    value_grad: str,
    need_values: bool,
    need_weights: bool,
) -> tuple[Tensor, Tensor]:
    if kernels.resolve_backend(backend, values) == "triton":
        from kernels import bag_triton

        # the Triton autograd function's own backward, on the tensors its forward would have saved
        ctx = SimpleNamespace(
            saved_tensors=(values, indices, weights),
            value_grad=value_grad,
            needs_input_grad=(need_values, False, need_weights, False),
        )
        dv, _, dw = bag_triton.EmbeddingBag.backward(ctx, grad_out)[:3]
    else:
        dv, dw = _embedding_bag_backward_aten(grad_out, values, indices, weights, need_values, need_weights)
    # an op returns tensors only: an unneeded gradient comes back empty and is dropped
    return (dv if dv is not None else values.new_empty(0)), (dw if dw is not None else weights.new_empty(0))


@_embedding_bag_backward.register_fake
def _embedding_bag_backward_fake(grad_out, values, indices, weights, backend, value_grad, need_values, need_weights):
    return (
        values.new_empty(values.shape if need_values else 0),  # contiguous, as both backends return them
        weights.new_empty(weights.shape if need_weights else 0),
    )


def _bag_setup(ctx, inputs, output):
    values, indices, weights, backend, value_grad, _ = inputs
    ctx.save_for_backward(values, indices, weights)
    ctx.backend, ctx.value_grad = backend, value_grad


def _bag_backward(ctx, grad_out):
    values, indices, weights = ctx.saved_tensors
    need_values, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    dv, dw = _embedding_bag_backward(
        grad_out.contiguous(), values, indices, weights, ctx.backend, ctx.value_grad, need_values, need_weights
    )
    return (dv if need_values else None), None, (dw if need_weights else None), None, None, None


_embedding_bag.register_autograd(_bag_backward, setup_context=_bag_setup)


# ------------------------------------------------------------------ FLOPs, for torch's FlopCounterMode
# An opaque op hides its matmuls from the counter; these formulas state them with the
# convention of pretrain/model/accounting.py (multiply-add = 2, backward = 2x forward).
# The bag is a gather, not a matmul, and is left uncounted here as it is for aten ops.
# Registered by `register_flop_formulas()` (called when a memory layer is built, and on the
# first eager op call), not at import: torch.utils.flop_counter imports triton, which must
# not happen at import time (the kernel tests choose interpreted or compiled Triton first).
# A FlopCounterMode copies the registry when it is created, so register before that.
_flop_formulas_registered = False


def _scoring_flops(query_shape, keys_shape) -> int:
    T, H, k_dim = query_shape
    return 2 * T * H * keys_shape[1] * k_dim  # both half-key sets: 2 * T * H * n_keys * (k_dim / 2) each


def register_flop_formulas() -> None:
    """Tell torch's FlopCounterMode the scoring ops' FLOPs (idempotent)."""
    global _flop_formulas_registered
    if _flop_formulas_registered:
        return
    _flop_formulas_registered = True
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.memlayers.pkm_topk)
    def _pkm_topk_flops(query_shape, keys1_shape, keys2_shape, *args, out_shape=None, **kwargs) -> int:
        return _scoring_flops(query_shape, keys1_shape)

    @register_flop_formula(torch.ops.memlayers.pkm_topk_backward)
    def _pkm_topk_backward_flops(grad_shape, query_shape, keys1_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * _scoring_flops(query_shape, keys1_shape)


# ------------------------------------------------------------------ public entry points
def pkm_topk(query: Tensor, keys1: Tensor, keys2: Tensor, k: int, backend: str = "auto"):
    """`kernels.pkm_topk` as one custom op (same arguments, checks and result). The op's
    weights are fp32 (saved so for its backward); the cast to the query's dtype is
    outside it, so autograd casts the weights' gradient back to fp32 for the op."""
    kernels.resolve_backend(backend, query)  # a bad name fails here, before any tracing
    if not torch.compiler.is_compiling():
        register_flop_formulas()
    weights, indices = torch.ops.memlayers.pkm_topk(query, keys1, keys2, k, backend)
    return weights.to(query.dtype), indices


def embedding_bag(
    values: Tensor,
    indices: Tensor,
    weights: Tensor,
    backend: str = "auto",
    value_grad: str = "sorted",
    check_indices: bool = True,
) -> Tensor:
    """`kernels.embedding_bag` as one custom op (`check_indices` as there); value_grad="sparse"
    keeps the plain path (`sparse_embedding_bag`)."""
    kernels.resolve_backend(backend, values)
    if value_grad == "sparse":
        return sparse_embedding_bag(values, indices, weights, backend, check_indices)
    return torch.ops.memlayers.embedding_bag(values, indices, weights, backend, value_grad, check_indices)


def sparse_embedding_bag(
    values: Tensor, indices: Tensor, weights: Tensor, backend: str, check_indices: bool = True
) -> Tensor:
    """The bag with value_grad="sparse": the plain `kernels.embedding_bag` path, no custom op
    (its gradient, a COO tensor of the rows read, has a data-dependent size and no fake).
    `pretrain.parallel.compile.apply_compile` has it run eagerly inside compiled blocks: dynamo
    tracing into the Triton path's autograd.Function and launches failed (interpreted on CPU:
    an InterpreterError at the first compiled forward)."""
    return kernels.embedding_bag(
        values, indices, weights, backend=backend, value_grad="sparse", check_indices=check_indices
    )
