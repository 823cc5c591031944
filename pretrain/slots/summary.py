"""Summary statistics of a slot access distribution: TensorBoard scalars and the console line.

For counts c over N slots with p = c / sum(c): fraction of slots used (c > 0), entropy
H(p) in nats, KL(p || uniform) = log N - H(p), and the share of accesses taken by the
most-used 1% of slots (ceil(N / 100) slots). Computed in float64 on the counts' device.
`usage_lines` prints the scalars `SlotStatistics.summary` logged, not a second computation.
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


def usage_lines(scalars: dict[str, float], layer_names: list[str], first_step: int, last_step: int) -> list[str]:
    """One console line per counter from `SlotStatistics.summary(interval=True)`'s scalars: the
    interval's (steps first_step..last_step) share of slots read, top-1% share and KL from
    uniform, then the share of slots read since the run began."""
    lines = []
    for n in layer_names:
        ever = f"{100 * scalars[f'slots/{n}/used_fraction']:.1f}% ever read"
        interval = {k: scalars[f"slots/{n}/interval/{k}"] for k in ("used_fraction", "top1pct_share", "kl_uniform")}
        head = f"slots {n} " + (f"steps {first_step}-{last_step}:" if last_step > first_step else f"step {last_step}:")
        if interval["used_fraction"] == 0:  # no access at all: every step of the interval was skipped
            lines.append(f"{head} no slot accesses (skipped steps); {ever}")
            continue
        lines.append(
            f"{head} {100 * interval['used_fraction']:.1f}% of slots read, "
            f"top 1% of slots {100 * interval['top1pct_share']:.1f}% of accesses, "
            f"KL from uniform {interval['kl_uniform']:.3f} nats; {ever}"
        )
    return lines
