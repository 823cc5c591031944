"""The language-model training objective: next-token cross-entropy in fp32, and PaLM's
z-loss term (optim.z_loss), each a mean over the positions that have a target.

Written without data-dependent shapes (the ignored positions are masked, not dropped), so
that `torch.compile` traces it whole: under train.compile the trainer runs it compiled
(pretrain/parallel/compile.py `compile_objective`), and inductor then reads the bf16
logits once per reduction instead of materialising their fp32 copy, its log-softmax and
their gradients (about 6 GiB of temporaries for 8 x 2048 tokens over a 32K vocabulary).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Objective(NamedTuple):
    """One micro-batch's terms: `loss` (the cross-entropy, what is logged), `z` (the z-loss
    term, None when its weight is 0) and `total` (what is differentiated)."""

    loss: torch.Tensor
    z: torch.Tensor | None
    total: torch.Tensor


def language_model_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean next-token cross-entropy in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def z_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean of log(Z)^2 over the positions with a target, Z the softmax normaliser (fp32): the
    auxiliary loss of PaLM (optim.z_loss) that keeps the output logits from drifting large."""
    keep = targets.flatten() != ignore_index
    log_z = torch.logsumexp(logits.float().flatten(0, 1), dim=-1)
    return torch.where(keep, log_z.square(), 0.0).sum() / keep.sum()


def training_objective(
    logits: torch.Tensor, targets: torch.Tensor, z_weight: float = 0.0, ignore_index: int = -100
) -> Objective:
    """Cross-entropy, and with `z_weight` > 0 the z term, and loss + z_weight * z."""
    loss = language_model_loss(logits, targets, ignore_index)
    if not z_weight:
        return Objective(loss, None, loss)
    z = z_loss(logits, targets, ignore_index)
    return Objective(loss, z, loss + z_weight * z)
