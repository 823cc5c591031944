"""Weighted embedding bag in Triton: forward, value gradient (sorted or atomic, dense
or sparse) and per-weight gradient, wrapped in an autograd Function.

Shapes: values (N, d) fp32/bf16/fp16 with unit column stride (a column slice
`values[:, a:b]` of a partitioned pool is read in place), indices/weights (T, H, k)
-> out (T, d) = sum over heads h and slots j of weights[t,h,j] * values[indices[t,h,j]].
Let M = T*H*k entries, U = unique rows among them, e = element size of values.

Forward: one program per (BLOCK_T tokens, BLOCK_D columns). It walks the token's M/T
entries BLOCK_J at a time, gathering a (BLOCK_T, BLOCK_J, BLOCK_D) tile of rows with
contiguous, vectorisable column loads, and accumulates in fp32 registers; the output
is written once. Bytes: M*d*e gathered + M*(8 + w) for indices and weights + T*d*e out.

Per-weight gradient: one program per (BLOCK_T tokens, BLOCK_J entries), looping over
the columns: dweights[t,h,j] = <grad_out[t], values[indices[t,h,j]]>. Bytes: M*d*e
gathered + T*d*e of grad_out + M*(8 + w).

Backward, "sorted" (the default, deterministic): the M entries are sorted by row
(stable radix sort of int32 row ids). One program per (row, BLOCK_D columns) -- every
table row for the dense form, the U touched rows for the sparse form -- walks the row's
segment in a fixed order, BLOCK_E entries at a time, and from the same loaded
grad_out[token] rows computes both gradients: dvalues[row] = sum of weight *
grad_out[token] (fp32 accumulation; the row written once, zeros if untouched, so the
dense form needs no separate fill) and, per entry, dweight = <grad_out[token],
values[row]> with the value row loaded once per row rather than once per entry. No
atomics: repeated runs are bitwise identical. When d spans several column tiles, each
tile writes partial dweights to its own buffer row, summed afterwards in a fixed order.
A row read more than ROW_CHUNK times (a hot slot) would make its one program the tail
of the launch: such rows are cut into chunks, each chunk's fp32 partial row is written
by the same kernel, and a second launch of it sums each row's chunks in order.
Bytes: M*d*e' of grad_out rows (e' = grad element size) + U*d*e of value rows read +
U*d*e written + M*(8 + 2w), plus (N - U)*d*e of zeros in the dense form. The unfused
alternative (the per-weight kernel above plus a value-gradient pass) reads the M
gathered value rows and the M grad_out rows separately.

Value gradient, "atomic": one program per (BLOCK_E entries, BLOCK_D columns) does
`tl.atomic_add` of weight * grad_out[token] into an fp32 (N, d) buffer, cast at the end
(bf16 atomics would lose precision, and the interpreter cannot do them). Faster when
rows repeat little, but the float addition order varies between runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import VALUE_GRADS
from kernels.launch_configs import pinned_autotune
from kernels.triton_common import INTERPRETING, check_same_device, next_pow2


@triton.jit
def _bag_fwd_kernel(
    values_ptr,
    idx_ptr,
    w_ptr,
    out_ptr,
    T,
    M_T,
    D,
    stride_v,
    stride_o,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = toks < T
    cmask = cols < D
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for j0 in range(0, M_T, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        emask = tmask[:, None] & (js < M_T)[None, :]
        entry = toks[:, None].to(tl.int64) * M_T + js[None, :]
        rows = tl.load(idx_ptr + entry, mask=emask, other=0).to(tl.int64)
        w = tl.load(w_ptr + entry, mask=emask, other=0.0).to(tl.float32)
        vals = tl.load(
            values_ptr + rows[:, :, None] * stride_v + cols[None, None, :],
            mask=emask[:, :, None] & cmask[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(vals * w[:, :, None], axis=1)
    out = out_ptr + toks[:, None].to(tl.int64) * stride_o + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])


@triton.jit
def _bag_weight_grad_kernel(
    values_ptr,
    idx_ptr,
    g_ptr,
    gw_ptr,
    T,
    M_T,
    D,
    stride_v,
    stride_g,
    BLOCK_T: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    tmask = toks < T
    emask = tmask[:, None] & (js < M_T)[None, :]
    entry = toks[:, None].to(tl.int64) * M_T + js[None, :]
    rows = tl.load(idx_ptr + entry, mask=emask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_J), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        cmask = cols < D
        g = tl.load(
            g_ptr + toks[:, None].to(tl.int64) * stride_g + cols[None, :],
            mask=tmask[:, None] & cmask[None, :],
            other=0.0,
        ).to(tl.float32)
        vals = tl.load(
            values_ptr + rows[:, :, None] * stride_v + cols[None, None, :],
            mask=emask[:, :, None] & cmask[None, None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(vals * g[:, None, :], axis=2)
    tl.store(gw_ptr + entry, acc.to(gw_ptr.dtype.element_ty), mask=emask)


@triton.jit
def _bag_bwd_sorted_kernel(
    g_ptr,
    w_ptr,
    v_ptr,
    perm_ptr,
    starts_ptr,
    ends_ptr,
    rows_ptr,
    out_ptr,
    gw_ptr,
    M,
    M_T,
    D,
    stride_g,
    stride_v,
    stride_o,
    DENSE: tl.constexpr,
    NEED_DW: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    u = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    start = tl.load(starts_ptr + u)
    end = tl.load(ends_ptr + u)
    if DENSE:  # one program per table row; untouched rows write their zeros
        row = u.to(tl.int64)
    else:  # one program per touched row
        row = tl.load(rows_ptr + u).to(tl.int64)
    if NEED_DW:
        touched = (cols * 0 + end) > start  # a block mask (a scalar one breaks the interpreter): no read if untouched
        v = tl.load(v_ptr + row * stride_v + cols, mask=cmask & touched, other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for e0 in range(start, end, BLOCK_E):
        es = e0 + tl.arange(0, BLOCK_E)
        emask = es < end
        entry = tl.load(perm_ptr + es, mask=emask, other=0)
        w = tl.load(w_ptr + entry, mask=emask, other=0.0).to(tl.float32)
        tok = entry // M_T
        g = tl.load(
            g_ptr + tok[:, None] * stride_g + cols[None, :], mask=emask[:, None] & cmask[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(g * w[:, None], axis=0)
        if NEED_DW:  # partial dot over this column tile, at the entry's sorted position
            tl.store(gw_ptr + cb.to(tl.int64) * M + es, tl.sum(g * v[None, :], axis=1), mask=emask)
    tl.store(out_ptr + u.to(tl.int64) * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _bag_value_grad_atomic_kernel(
    g_ptr, w_ptr, idx_ptr, buf_ptr, M, M_T, D, stride_g, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr
):
    es = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    emask = es < M
    mask = emask[:, None] & (cols < D)[None, :]
    rows = tl.load(idx_ptr + es, mask=emask, other=0).to(tl.int64)
    w = tl.load(w_ptr + es, mask=emask, other=0.0).to(tl.float32)
    tok = es.to(tl.int64) // M_T
    g = tl.load(g_ptr + tok[:, None] * stride_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(buf_ptr + rows[:, None] * D + cols[None, :], g * w[:, None], mask=mask)


def _configs(*triples):
    return [triton.Config(dict(zip(("BLOCK_T", "BLOCK_J", "BLOCK_D"), t[:3])), num_warps=t[3]) for t in triples]


if INTERPRETING:  # one fixed configuration; the interpreter cannot autotune over several
    _bag_fwd, _bag_weight_grad, _bag_bwd_sorted = _bag_fwd_kernel, _bag_weight_grad_kernel, _bag_bwd_sorted_kernel
else:
    # Memory-bound gathers: many rows in flight per program, 16-byte column vectors.
    # Pinned winners per GPU live in kernels/launch_configs.py; other shapes autotune.
    # On the H200 (abf31f5) the widest column block with the fewest entries per step won
    # (1, 8, 1024, 4: 85% of 4.8 TB/s, the next 1.45x slower): the last four extend that
    # direction for the next --configs run.
    _bag_fwd = pinned_autotune(
        "bag_fwd",
        _configs(
            (1, 16, 512, 4),
            (1, 32, 256, 4),
            (2, 16, 256, 4),
            (4, 8, 256, 8),
            (1, 16, 1024, 8),
            (1, 8, 1024, 4),
            (1, 4, 1024, 4),
            (1, 8, 1024, 8),
            (1, 4, 1024, 2),
            (1, 8, 2048, 8),
        ),
        key=["M_T", "D"],
    )(_bag_fwd_kernel)
    _bag_weight_grad = pinned_autotune(
        "bag_weight_grad",
        _configs((1, 32, 128, 4), (1, 16, 256, 4), (2, 16, 128, 4), (1, 64, 64, 4), (1, 32, 256, 8)),
        key=["M_T", "D"],
    )(_bag_weight_grad_kernel)
    # Entries per step x warps. Rows repeat ~M/U times (about 4 at the paper's shape), so
    # few entries per step keep registers low and many rows in flight; reruns during
    # tuning are harmless (every written element is overwritten with the same value).
    _bag_bwd_sorted = pinned_autotune(
        "bag_bwd_sorted",
        [
            triton.Config({"BLOCK_E": e}, num_warps=w)
            for e, w in ((4, 4), (4, 8), (8, 4), (8, 8), (2, 4), (16, 8), (2, 2), (2, 8))  # (2, 4) won on the H200
        ],
        key=["D", "DENSE", "NEED_DW"],
    )(_bag_bwd_sorted_kernel)


def _block_d(D: int, cap: int) -> int:
    return min(cap, max(16, next_pow2(D)))


def _flat(indices: torch.Tensor, weights: torch.Tensor):
    """(T, H*k) views of (T, H, k) entries; explicit widths, so T = 0 works."""
    return indices.flatten(1).contiguous(), weights.flatten(1).contiguous()


def _check(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, check_indices: bool) -> None:
    """Shapes, dtypes and devices; with `check_indices` also the indices' range, read on the host:
    on a GPU that waits for every queued kernel (`embedding_bag`'s docstring says when to skip it)."""
    check_same_device(values=values, indices=indices, weights=weights)
    if values.dim() != 2 or values.stride(1) != 1:
        raise ValueError(
            f"values must be a 2-D (N, d) tensor with unit column stride, got shape "
            f"{tuple(values.shape)} strides {values.stride()}"
        )
    if indices.shape != weights.shape or indices.dim() < 2:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must both be (T, H, k)")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    if check_indices and indices.numel():
        lo, hi = torch.stack(torch.aminmax(indices)).tolist()  # one read
        if lo < 0 or hi >= values.shape[0]:
            raise ValueError(
                f"indices span [{lo}, {hi}] outside the value table's "
                f"{values.shape[0]} rows (check memory.n_keys against the value table)"
            )


def bag_forward(
    values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, check_indices: bool = True
) -> torch.Tensor:
    """out (T, d) in values.dtype; no autograd. `check_indices`: see `embedding_bag`."""
    _check(values, indices, weights, check_indices)
    idx, w = _flat(indices, weights)
    T, M_T = idx.shape
    D = values.shape[1]
    out = torch.empty(T, D, dtype=values.dtype, device=values.device)
    if T == 0 or D == 0:
        return out
    if INTERPRETING:
        bt, bj, bd = 4, 8, _block_d(D, 64)
        _bag_fwd[(triton.cdiv(T, bt), triton.cdiv(D, bd))](
            values, idx, w, out, T, M_T, D, values.stride(0), out.stride(0), BLOCK_T=bt, BLOCK_J=bj, BLOCK_D=bd
        )
    else:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(D, meta["BLOCK_D"]))  # noqa: E731
        _bag_fwd[grid](values, idx, w, out, T, M_T, D, values.stride(0), out.stride(0))
    return out


def bag_weight_grad(
    grad_out: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, weights_dtype: torch.dtype
) -> torch.Tensor:
    """dweights (T, H, k): dot of grad_out[t] with each selected row, fp32 accumulation."""
    idx = indices.flatten(1).contiguous()
    T, M_T = idx.shape
    D = values.shape[1]
    grad_out = grad_out.contiguous()
    gw = torch.empty(T, M_T, dtype=weights_dtype, device=values.device)
    if gw.numel() == 0:
        return gw.reshape(indices.shape)
    if INTERPRETING:
        bt, bj, bd = 4, 8, _block_d(D, 64)
        _bag_weight_grad[(triton.cdiv(T, bt), triton.cdiv(M_T, bj))](
            values,
            idx,
            grad_out,
            gw,
            T,
            M_T,
            D,
            values.stride(0),
            grad_out.stride(0),
            BLOCK_T=bt,
            BLOCK_J=bj,
            BLOCK_D=bd,
        )
    else:
        grid = lambda meta: (triton.cdiv(T, meta["BLOCK_T"]), triton.cdiv(M_T, meta["BLOCK_J"]))  # noqa: E731
        _bag_weight_grad[grid](values, idx, grad_out, gw, T, M_T, D, values.stride(0), grad_out.stride(0))
    return gw.reshape(indices.shape)


def _segments(indices: torch.Tensor, num_rows: int, every_row: bool):
    """Stable sort of the flat entries by row: (rows, segment offsets, entry order).

    `num_rows` bounds the row ids (the value table's size). With `every_row` each table row
    gets a (possibly empty) segment, offsets (num_rows+1,) and rows None; without, only the U
    touched rows, ascending, offsets (U+1,).
    """
    flat = indices.reshape(-1)
    # 32-bit keys sort about twice as fast; row ids fit (the packed top-k caps N below 2**31).
    sorted_rows, perm = torch.sort(flat.to(torch.int32) if num_rows < 2**31 else flat, stable=True)
    if every_row:
        # Row r's segment starts at the number of entries below r: a binary search per row. The
        # offsets of bincount + cumsum, without bincount's host read of the largest id (it sizes
        # its output on the host: a GPU->CPU wait per layer and micro-batch).
        bounds = torch.arange(num_rows + 1, dtype=sorted_rows.dtype, device=flat.device)
        return None, torch.searchsorted(sorted_rows, bounds), perm
    rows, counts = torch.unique_consecutive(sorted_rows, return_counts=True)  # U: a size the host must know
    seg = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=seg[1:])
    return rows, seg, perm


def _sorted_block_d(D: int) -> int:
    """A whole value row per program up to 2048 columns (dweights then need no second pass)."""
    return _block_d(D, 64 if INTERPRETING else 2048)


# The most entries one program reduces. A row read more often (a hot slot of a trained
# memory can take a large share of a batch) is split into chunks whose fp32 partial rows
# are then summed in order, so one row never serialises the whole launch.
ROW_CHUNK = 1024


def _launch_sorted(g, w, table, perm, starts, ends, rows, out, dw_parts, M, M_T, dense, need_dw):
    programs, D = starts.numel(), g.shape[1]
    bd = _sorted_block_d(D)
    if programs and D:
        extra = dict(BLOCK_E=8, num_warps=4) if INTERPRETING else {}
        _bag_bwd_sorted[(programs, triton.cdiv(D, bd))](
            g,
            w,
            table,
            perm,
            starts,
            ends,
            rows,
            out,
            dw_parts,
            M,
            M_T,
            D,
            g.stride(0),
            table.stride(0),
            out.stride(0),
            DENSE=dense,
            NEED_DW=need_dw,
            BLOCK_D=bd,
            **extra,
        )


def _reduce_hot_rows(grad_out, w, table, perm, starts, ends, hot, rows, out_rows, dw_parts, M, M_T, need_dw):
    """The hot rows' gradient rows into out_rows[row] (and their entries' dweight partials):
    each hot row cut into chunks of ROW_CHUNK entries from its segment's start, one program per
    chunk writing an fp32 partial row, then one program per hot row summing its chunks in order.

    Sizes come from M alone: at most M // (ROW_CHUNK + 1) rows are hot, in at most
    M // ROW_CHUNK + that many chunks (all full but each row's last). Spare chunk programs get
    an empty segment (a zero partial row), spare sums go to out_rows' spare last row."""
    P, D, dev, R = starts.numel(), grad_out.shape[1], grad_out.device, ROW_CHUNK
    max_hot = M // (R + 1)
    max_chunks = M // R + max_hot
    n_chunks = torch.where(hot, (ends - starts + R - 1) // R, 0)
    chunk_end = torch.cumsum(n_chunks, 0)  # per row: one past its last chunk
    chunk_first = chunk_end - n_chunks
    chunk = torch.arange(max_chunks, device=dev)
    owner = torch.searchsorted(chunk_end, chunk, right=True)  # the row whose chunks hold it; P: spare
    real = owner < P
    owner = owner.clamp(max=P - 1)
    c_starts = torch.where(real, starts[owner] + (chunk - chunk_first[owner]) * R, 0)
    c_ends = torch.where(real, torch.minimum(c_starts + R, ends[owner]), 0)
    c_rows = owner if rows is None else rows[owner].to(torch.int64)
    parts = torch.empty(max_chunks, D, dtype=torch.float32, device=dev)
    _launch_sorted(grad_out, w, table, perm, c_starts, c_ends, c_rows, parts, dw_parts, M, M_T, False, need_dw)
    # The h-th hot row is the first with h + 1 hot rows up to it. Its chunk rows are summed in
    # order: the same kernel over `parts` as the "grad_out", the identity as entry order, unit weights.
    hot_row = torch.searchsorted(torch.cumsum(hot, 0), torch.arange(1, max_hot + 1, device=dev))
    real = hot_row < P
    hot_row_in = hot_row.clamp(max=P - 1)
    first = torch.where(real, chunk_first[hot_row_in], 0)
    last = torch.where(real, chunk_end[hot_row_in], 0)
    sums = torch.empty(max_hot, D, dtype=out_rows.dtype, device=dev)
    ones = torch.ones(max_chunks, device=dev)
    _launch_sorted(parts, ones, parts, chunk, first, last, first, sums, dw_parts, max_chunks, 1, False, False)
    out_rows.index_copy_(0, torch.where(real, hot_row, P), sums)  # the spare ones onto the spare row P


def bag_backward_sorted(
    grad_out: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    num_rows: int,
    dtype: torch.dtype,
    values: torch.Tensor | None = None,
    dense: bool = True,
):
    """Deterministic fused backward: (dvalues, dweights), dweights only when `values` is given.

    num_rows is the value table's size (row ids lie below it). dvalues is (num_rows, d) in
    `dtype` when `dense`, else the pair (unique rows (U,) ascending, their gradient rows (U, d)).
    """
    need_dw = values is not None
    rows, seg, perm = _segments(indices, num_rows, every_row=dense)
    programs = seg.numel() - 1
    M = indices.numel()
    M_T = indices[0].numel() if indices.shape[0] else 1
    D = grad_out.shape[1]
    dev = grad_out.device
    grad_out = grad_out.contiguous()
    w = weights.reshape(-1).contiguous()
    table = values if need_dw else grad_out  # the kernel reads no value row without NEED_DW
    rows_arg = seg if rows is None else rows  # dense: program u is table row u
    n_cb = triton.cdiv(D, _sorted_block_d(D)) if D else 0
    dw_parts = torch.empty(max(n_cb, 1), M if need_dw else 1, dtype=torch.float32, device=dev)
    starts, ends = seg[:-1], seg[1:]
    # A hot row has more than ROW_CHUNK entries: none can unless M does. Which rows are hot is
    # not read on the host (a GPU->CPU wait per layer and micro-batch): `_reduce_hot_rows` runs
    # launches of fixed sizes whose spare programs are empty.
    may_be_hot = programs > 0 and M > ROW_CHUNK
    hot = (ends - starts) > ROW_CHUNK if may_be_hot else None
    # Every row of `out` is written by its program (zeros where untouched): no separate fill. A
    # spare last row takes the spare hot-row sums and is cut off.
    out_rows = torch.empty(programs + int(may_be_hot), D, dtype=dtype, device=dev)
    out = out_rows[:programs]
    # Hot rows get an empty segment here (a placeholder row) and are done in chunks below.
    _launch_sorted(
        grad_out,
        w,
        table,
        perm,
        starts,
        torch.where(hot, starts, ends) if may_be_hot else ends,
        rows_arg,
        out,
        dw_parts,
        M,
        M_T,
        dense,
        need_dw,
    )
    if may_be_hot:
        _reduce_hot_rows(grad_out, w, table, perm, starts, ends, hot, rows, out_rows, dw_parts, M, M_T, need_dw)
    dvalues = out if dense else (rows.to(torch.int64), out)
    if not need_dw:
        return dvalues, None
    sorted_dw = dw_parts[0] if n_cb <= 1 else dw_parts.sum(0)  # fixed order: deterministic
    dweights = torch.empty(M, dtype=torch.float32, device=dev)
    dweights[perm] = sorted_dw
    return dvalues, dweights.to(weights.dtype).reshape(indices.shape)


def bag_value_grad_sorted(
    grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, num_rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense dvalues (num_rows, d), deterministic: sort + per-row segment reduction."""
    return bag_backward_sorted(grad_out, indices, weights, num_rows, dtype)[0]


def bag_value_grad_sparse(grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype):
    """Touched rows only: (unique rows (U,) int64 ascending, their gradient rows (U, d))."""
    num_rows = int(indices.max()) + 1 if indices.numel() else 0
    return bag_backward_sorted(grad_out, indices, weights, num_rows, dtype, dense=False)[0]


def bag_value_grad_atomic(
    grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, num_rows: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense dvalues (num_rows, d) by fp32 atomics; addition order (last bits) varies by run."""
    idx, w = _flat(indices, weights)
    T, M_T = idx.shape
    D = grad_out.shape[1]
    grad_out = grad_out.contiguous()
    buf = torch.zeros(num_rows, D, dtype=torch.float32, device=grad_out.device)
    M = idx.numel()
    if M and D:
        bd = _block_d(D, 64 if INTERPRETING else 256)
        be = 8 if INTERPRETING else 16
        _bag_value_grad_atomic_kernel[(triton.cdiv(M, be), triton.cdiv(D, bd))](
            grad_out, w, idx, buf, M, M_T, D, grad_out.stride(0), BLOCK_E=be, BLOCK_D=bd, num_warps=4
        )
    return buf if dtype == torch.float32 else buf.to(dtype)


class EmbeddingBag(torch.autograd.Function):
    """Triton forward and backward; `value_grad` picks the value-gradient algorithm."""

    @staticmethod
    def forward(ctx, values, indices, weights, value_grad, check_indices=True):
        out = bag_forward(values, indices, weights, check_indices)
        ctx.save_for_backward(values, indices, weights)
        ctx.value_grad = value_grad
        return out

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, weights = ctx.saved_tensors
        need_dv, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_values = grad_weights = None
        if need_dv and ctx.value_grad in ("sorted", "sparse"):
            dense = ctx.value_grad == "sorted"
            grad_values, grad_weights = bag_backward_sorted(
                grad_out, indices, weights, values.shape[0], values.dtype, values if need_dw else None, dense
            )
            if not dense:
                rows, grad_rows = grad_values
                grad_values = torch.sparse_coo_tensor(
                    rows[None], grad_rows, values.shape, is_coalesced=True, check_invariants=False
                )
        elif need_dv:
            grad_values = bag_value_grad_atomic(grad_out, indices, weights, values.shape[0], values.dtype)
        if need_dw and grad_weights is None:
            grad_weights = bag_weight_grad(grad_out, values, indices, weights.dtype)
        return grad_values, None, grad_weights, None, None


def embedding_bag(
    values: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    value_grad: str = "sorted",
    check_indices: bool = True,
) -> torch.Tensor:
    """Differentiable weighted bag (T, d). value_grad: "sorted" (deterministic, default),
    "atomic" (fp32 atomics) or "sparse" (a sparse COO gradient holding only touched rows).

    `check_indices` (default): refuse indices outside [0, N) with a ValueError naming their
    range, before any kernel reads out of bounds. The check reads two numbers on the host,
    which on a GPU waits for all queued work. Callers whose indices are in range by
    construction pass False: the memory layers (product-key top-k gives i1 * n + i2 < n**2,
    the table's rows), where it cost a GPU->CPU wait per layer and micro-batch."""
    if value_grad not in VALUE_GRADS:
        raise ValueError(f"value_grad={value_grad!r} must be one of {VALUE_GRADS}")
    return EmbeddingBag.apply(values, indices, weights, value_grad, check_indices)
