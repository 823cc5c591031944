"""Summary statistics of a slot access distribution, for TensorBoard.

For counts c over N slots with p = c / sum(c): fraction of slots used (c > 0), entropy
H(p) in nats, KL(p || uniform) = log N - H(p), and the share of accesses taken by the
most-used 1% of slots (ceil(N / 100) slots). Computed in float64 on the counts' device.
"""

from __future__ import annotations

import math

import torch


def distribution_summary(counts: torch.Tensor) -> dict[str, float]:
    n = counts.numel()
    c = counts.to(torch.float64)
    total = c.sum()
    if total.item() == 0:
        return {"used_fraction": 0.0, "entropy": 0.0, "kl_uniform": 0.0, "top1pct_share": 0.0}
    p = c / total
    entropy = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum().item()
    top = max(1, math.ceil(n / 100))
    return {
        "used_fraction": (counts > 0).sum().item() / n,
        "entropy": entropy,
        "kl_uniform": math.log(n) - entropy,
        "top1pct_share": (c.topk(top).values.sum() / total).item(),
    }
