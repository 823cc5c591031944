"""Optimizer parameter groups (the schedule is pretrain/lr_schedule.py).

Dense parameters go to DeepSpeed with two AdamW groups: matrices with weight decay,
norms/biases/1-D tensors without. Memory values are not here: pretrain.parallel holds
them outside the engine with their own optimizer at `optim.value_lr`, following the
same schedule multiplier.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.config import OptimConfig


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be turned into a no-op (a non-finite loss was seen).

    DeepSpeed wraps this optimizer at every ZeRO stage and calls its `step()`; making
    that call a no-op skips the update uniformly for stages 0-3 and fp32/bf16.
    """

    skip_next = False

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip_next:
            self.skip_next = False
            return None
        return super().step(closure)


def dense_param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Two groups of the engine's parameters: decayed matrices and undecayed norms/biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and not name.endswith("keys1") and not name.endswith("keys2") else no_decay).append(
            param
        )
    return [
        {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_dense_optimizer(model: nn.Module, cfg: OptimConfig) -> SkippableAdamW:
    return SkippableAdamW(
        dense_param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True
    )


def set_learning_rate(optimizer, lr: float) -> None:
    """Set every group's lr (DeepSpeed's ZeRO wrappers expose the inner optimizer's groups)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
