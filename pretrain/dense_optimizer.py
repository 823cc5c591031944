"""The dense parameters' optimizer (the schedule is pretrain/lr_schedule.py; pretrain/optimizers.py
drives it and the value shards' optimizer as one step).

Dense parameters go to DeepSpeed with two AdamW groups: matrices with weight decay,
norms/biases/1-D tensors without, in a `SkippableAdamW` (a step can be skipped). Memory values
are not here: pretrain.parallel holds them outside the engine with their own optimizer at
`optim.value_lr`, following the same schedule multiplier. `squared_norm` is the float64
gradient norm both clipping paths (dense at ZeRO 0, and the value tables) take.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from pretrain.config import OptimConfig


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose steps are no-ops while `skip` is set (a non-finite loss or, at ZeRO 0, gradient
    norm was seen), or when `step_norm()` gives a non-finite number: the global gradient norm
    DeepSpeed's ZeRO or bf16 wrapper has just computed for this step, before it calls this
    optimizer. DeepSpeed 0.19 skips such a step itself at ZeRO 1-3 and in its bf16 optimizer
    (the bf16 check is a config switch, on by default); the guard keeps the weights whole where a
    version or setting does not, since the clipped update would write NaN into every weight.

    DeepSpeed wraps this optimizer at every ZeRO stage. The flag holds for the whole of one
    `engine.step()` (`Optimizers.step` sets and clears it): ZeRO calls `step()` once per
    parameter group, and on non-finite gradients DeepSpeed may skip the call itself, so a flag
    consumed by the first call would skip one group only, or leak into the next step.
    """

    skip = False
    step_norm = None  # () -> this step's global gradient norm from DeepSpeed's wrapper, or None

    @torch.no_grad()
    def step(self, closure=None):
        if self.skip:
            return None
        norm = self.step_norm() if self.step_norm is not None else None
        if norm is not None and not math.isfinite(float(norm)):
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


def squared_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The sum of squares of all entries of `tensors`, a float64 scalar: each tensor's rows
    are reduced in float32 (no float64 copy of an (N, d) gradient), their squares summed in
    float64. A whole-tensor float32 norm on the CPU accumulates serially: 0.6% low at 2^26
    entries (a 512K x 128 value table), further off the larger the tensor."""
    total = torch.zeros((), dtype=torch.float64, device=tensors[0].device if tensors else None)
    for t in tensors:
        rows = t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1)
        total += torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float32).double().square().sum()
    return total
