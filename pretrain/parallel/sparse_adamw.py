"""Lazy AdamW for value shards with row-sparse gradients (`optim.value_optimizer=sparse_adamw`
or `sparse_rowwise_adamw`).

Per step only the rows in the gradient (the rows some lookup read) are touched: their
moments are updated with that step's gradient and their values move; every other row,
and its moments, keep their bits. Cost per step follows the U rows read, not the N rows
of the pool. This is "lazy Adam" (TensorFlow's LazyAdamOptimizer,
torch.optim.SparseAdam); with no weight decay (the value pool has none) the update of a
row read at step t is exactly AdamW's:

    m_r = b1 m_r + (1 - b1) g_r          v_r = b2 v_r + (1 - b2) g_r^2
    x_r -= lr / (1 - b1^t) * m_r / (sqrt(v_r) / sqrt(1 - b2^t) + eps)

Second moment (`second_moment`):
  * "element" (`sparse_adamw`): v_r has one entry per value, as in AdamW. The state is
    the dense optimizer's (exp_avg, exp_avg_sq, step), so checkpoints of `adamw` and
    `sparse_adamw` are interchangeable and re-shard alike.
  * "row" (`sparse_rowwise_adamw`): one v per row, fed the mean of g_r^2 over the
    row's full width (all column shards: the `row_sq_mean` hook, MemoryParallel's, sums
    the local sums over the memory group). This is the "partial row-wise Adam" of large
    embedding tables (FBGEMM/TorchRec): the state shrinks from 2 N d to N d + N floats, so a value pool
    with its optimizer needs 2 N d floats instead of 3 N d, at the price of one step
    size per row rather than per value. Its checkpoints hold exp_avg_sq_row (N,) and do
    not load into the element-wise optimizers (nor the reverse).

First moment storage (`momentum_dtype`): float32, or bfloat16 to halve it
(`optim.value_momentum_dtype`; FBGEMM's embedding optimizers offer the same). The update
is computed in fp32 from the stored value and rounded to nearest when stored: with
b1 = 0.9 each step moves m by 10% of the gradient, far above bfloat16's 0.4% spacing,
so m does not stall. The second moment stays fp32 (with b2 near 1 its per-step change
can fall below bfloat16's spacing). The pool with row-wise v and a bfloat16 m holds
1.5 N d + N floats' worth instead of 3 N d.

Bias correction: t is the optimizer's global step count (one per `step`, the same for
every row), as in SparseAdam and LazyAdam, not a per-row count of the steps that read
the row. Reasons:
  * a row read at every step gets exactly dense AdamW's update (the paper's
    semantics), and at the paper's shapes nearly every row is read every step;
  * no (N,) step counter per table, and the state re-shards like the dense one;
  * a row read for the first time late in training gets a damped first step
    (m = (1 - b1) g) instead of a full lr-sized, sign-like one from a fresh per-row
    correction, which keeps rarely read slots from jumping on one noisy gradient.
The cost of the choice: a row read rarely has moments that decay only when it is read,
so its effective step is larger than dense Adam's would be after a long gap (as with
any lazy Adam). Weight decay is refused: decaying only the rows read would make the
decay depend on how often a row is read.

Implementation: on CPU the row-wise update is `kernels.cpu_ops.rowwise_adam_`, one
compiled pass over the rows read (each row read and written once, the next rows
prefetched; 3x faster than the torch ops at 16.7M slots). Otherwise (the element-wise
update, accelerators, or no compiler) the rows are updated in blocks of at most ROW_BLOCK_ELEMENTS values:
gather the block's rows of the weights and moments, update them, scatter them back.
The temporaries stay small however many rows a step reads. The element-wise update runs
torch's fused AdamW kernel on the gathered block, the dense optimizer's arithmetic, so a
row read at every step matches `adamw` bitwise.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.optim.adamw import adamw as adamw_rows  # torch's functional AdamW

from kernels import cpu_ops
from pretrain.parallel import row_grads

# Values gathered per block. On CPU a block's rows must still be in cache (and their pages
# in the TLB) when they are written back: at 16.7M slots x v_dim 64, blocks of 1024 rows
# update 108K random rows in 52 ms against 86 ms with 16384-row blocks (64K slots: 13 vs
# 16 ms). On an accelerator each block is a handful of kernel launches, so blocks are large.
ROW_BLOCK_ELEMENTS = 1 << 16  # CPU: 256 KiB per fp32 temporary, within one core's L2
ACCELERATOR_ROW_BLOCK_ELEMENTS = 1 << 24  # 64 MiB per fp32 temporary
SECOND_MOMENTS = ("element", "row")


def row_block(width: int, device: torch.device | str = "cpu") -> int:
    """Rows per block: about ROW_BLOCK_ELEMENTS values (ACCELERATOR_ROW_BLOCK_ELEMENTS off
    the CPU), a multiple of 64 rows so that every block but the last spans whole SIMD
    vectors and the fused kernel's arithmetic per element is the one it applies to all
    rows at once (bitwise)."""
    elements = ROW_BLOCK_ELEMENTS if torch.device(device).type == "cpu" else ACCELERATOR_ROW_BLOCK_ELEMENTS
    return max(64, elements // max(1, width) // 64 * 64)


_WIDE_DTYPES = (torch.complex128, torch.int64, torch.int32, torch.int16)  # 16, 8, 4, 2 bytes


def _as_wide_rows(table: torch.Tensor) -> torch.Tensor:
    """The same bytes with each row as few elements as possible: torch's CPU index_select /
    index_copy_ move rows element by element, so a (N, 64) fp32 row as 16 complex128
    elements moves in ~0.6x the time, a bf16 row in ~0.3x (bit-exact: bytes are copied)."""
    row_bytes = table.shape[1] * table.element_size()
    if not table.is_contiguous():
        return table
    for dtype in _WIDE_DTYPES:
        size = dtype.itemsize
        if size >= table.element_size() and row_bytes % size == 0 and table.data_ptr() % size == 0:
            return table.view(dtype)
    return table


def gather_rows(table: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """table[rows] for a contiguous 2-D table, moved as wide elements."""
    return _as_wide_rows(table).index_select(0, rows).view(table.dtype)


def scatter_rows(table: torch.Tensor, rows: torch.Tensor, source: torch.Tensor) -> None:
    """table[rows] = source (rows unique), moved as wide elements."""
    wide = _as_wide_rows(table)
    wide.index_copy_(0, rows, source.to(table.dtype).contiguous().view(wide.dtype))


def local_row_sq_mean(sq_sums: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Mean of g^2 over a row when the parameter holds the whole row (no column shards)."""
    return sq_sums / param.shape[1]


class SparseAdamW(torch.optim.Optimizer):
    """Lazy Adam over parameters whose gradients are sparse COO (row-sparse) tensors.

    `row_sq_mean(sq_sums, param)` turns the per-row sums of g^2 over this parameter's
    columns into the mean over the row's full width (second_moment="row" only); the
    default assumes the parameter holds whole rows.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        second_moment: str = "element",
        row_sq_mean: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = local_row_sq_mean,
        momentum_dtype: torch.dtype | None = None,
    ):
        if weight_decay:
            raise ValueError(f"SparseAdamW takes no weight decay (got {weight_decay}): the value pool has none")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas {betas} must lie in [0, 1) (optim.beta1 / optim.beta2)")
        if second_moment not in SECOND_MOMENTS:
            raise ValueError(f"second_moment {second_moment!r} must be one of {SECOND_MOMENTS}")
        if momentum_dtype not in (None, torch.float32, torch.bfloat16):
            raise ValueError(f"momentum_dtype {momentum_dtype} must be torch.float32 or torch.bfloat16")
        self.second_moment, self.row_sq_mean, self.momentum_dtype = second_moment, row_sq_mean, momentum_dtype
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=self.momentum_dtype or p.dtype)
            if self.second_moment == "row":
                state["exp_avg_sq_row"] = p.new_zeros(p.shape[0])
            else:
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SparseAdamW.step takes no closure")
        for group in self.param_groups:
            hyper = group["lr"], *group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad = row_grads.rows_of(p.grad, p.shape[1], p)
                state = self._init_state(p)
                state["step"] += 1
                if self.second_moment == "row":
                    # collective: every rank of the memory group calls it, even with no rows
                    grad_sq = self.row_sq_mean(torch.linalg.vector_norm(grad, dim=1, dtype=torch.float32).square(), p)
                if rows.numel() == 0:
                    continue
                if self.second_moment == "row" and cpu_ops.rowwise_adam_(
                    p, state["exp_avg"], state["exp_avg_sq_row"], rows, grad, grad_sq, *hyper, float(state["step"])
                ):
                    continue  # CPU: the compiled one-pass update
                block = row_block(p.shape[1], p.device)
                for r0 in range(0, rows.numel(), block):
                    sl = slice(r0, r0 + block)
                    if self.second_moment == "row":
                        self._rowwise_block(p, state, rows[sl], grad[sl], grad_sq[sl], *hyper)
                    else:
                        self._elementwise_block(p, state, rows[sl], grad[sl], *hyper)

    @staticmethod
    def _elementwise_block(p, state, rows, grad, lr, beta1, beta2, eps) -> None:
        # torch's fused AdamW kernel on the gathered rows; rows are unique, so each copy
        # writes its row once (deterministic)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        x, v = gather_rows(p, rows), gather_rows(exp_avg_sq, rows)
        m = gather_rows(exp_avg, rows).to(p.dtype)
        adamw_rows(
            [x],
            [grad.to(p.dtype)],
            [m],
            [v],
            [],
            [state["step"] - 1],
            fused=True,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=lr,
            weight_decay=0.0,
            eps=eps,
            maximize=False,
        )
        scatter_rows(exp_avg, rows, m)
        scatter_rows(exp_avg_sq, rows, v)
        scatter_rows(p, rows, x)

    @staticmethod
    def _rowwise_block(p, state, rows, grad, grad_sq, lr, beta1, beta2, eps) -> None:
        t = float(state["step"])
        exp_avg, exp_avg_sq_row = state["exp_avg"], state["exp_avg_sq_row"]
        m = gather_rows(exp_avg, rows).to(p.dtype).lerp_(grad.to(p.dtype), 1 - beta1)
        v = exp_avg_sq_row.index_select(0, rows).mul_(beta2).add_(grad_sq.to(p.dtype), alpha=1 - beta2)
        denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
        x = gather_rows(p, rows).addcdiv_(m, denom.unsqueeze(1), value=-lr / (1 - beta1**t))
        scatter_rows(exp_avg, rows, m)
        exp_avg_sq_row.index_copy_(0, rows, v)
        scatter_rows(p, rows, x)
