"""Lazy AdamW for value shards with row-sparse gradients (`optim.value_optimizer=sparse_adamw`).

Per step only the rows in the gradient (the rows some lookup read) are touched: their
first and second moments are updated with that step's gradient and their values move;
every other row, and its moments, keep their bits. Cost per step follows the U rows
read, not the N rows of the pool. This is "lazy Adam" (TensorFlow's LazyAdamOptimizer,
torch.optim.SparseAdam); with no weight decay (the value pool has none) the update of a
row read at step t is exactly AdamW's:

    m_r = b1 m_r + (1 - b1) g_r          v_r = b2 v_r + (1 - b2) g_r^2
    x_r -= lr / (1 - b1^t) * m_r / (sqrt(v_r) / sqrt(1 - b2^t) + eps)

Bias correction: t is the optimizer's global step count (one per `step`, the same for
every row), as in SparseAdam and LazyAdam, not a per-row count of the steps that read
the row. Reasons:
  * a row read at every step gets exactly dense AdamW's update (the paper's
    semantics), and at the paper's shapes nearly every row is read every step;
  * the state is the dense optimizer's (exp_avg, exp_avg_sq, one step), so checkpoints
    of `adamw` and `sparse_adamw` are interchangeable and re-shard alike, with no
    (N,) step counter per table;
  * a row read for the first time late in training gets a damped first step
    (m = (1 - b1) g) instead of a full lr-sized, sign-like one from a fresh per-row
    correction, which keeps rarely read slots from jumping on one noisy gradient.
The cost of the choice: a row read rarely has moments that decay only when it is read,
so its effective step is larger than dense Adam's would be after a long gap (as with
any lazy Adam). Weight decay is refused: decaying only the rows read would make the
decay depend on how often a row is read.

Implementation: gather the rows of the weights and both moments, apply torch's fused
AdamW kernel to the gathered (U, width) block with step t, scatter them back. The
arithmetic per element is the dense optimizer's, so a row read at every step matches
`adamw` bitwise.
"""

from __future__ import annotations

import torch
from torch.optim.adamw import adamw as adamw_rows  # torch's functional AdamW

from pretrain.parallel import row_grads


class SparseAdamW(torch.optim.Optimizer):
    """Lazy Adam over parameters whose gradients are sparse COO (row-sparse) tensors."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        if weight_decay:
            raise ValueError(f"SparseAdamW takes no weight decay (got {weight_decay}): the value pool has none")
        if not 0.0 <= betas[0] < 1.0 or not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas {betas} must lie in [0, 1) (optim.beta1 / optim.beta2)")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("SparseAdamW.step takes no closure")
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad = row_grads.rows_of(p.grad, p.shape[1], p)
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                if rows.numel() == 0:
                    continue
                # gather the rows, run torch's fused AdamW kernel on them (the dense optimizer's
                # arithmetic, in one pass), scatter them back; rows are unique, so each copy
                # writes its row once (deterministic)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                x, m, v = p.index_select(0, rows), exp_avg.index_select(0, rows), exp_avg_sq.index_select(0, rows)
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
                exp_avg.index_copy_(0, rows, m)
                exp_avg_sq.index_copy_(0, rows, v)
                p.index_copy_(0, rows, x)
