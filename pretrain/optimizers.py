"""The two optimizers of a step, driven as one: the dense parameters' (inside the DeepSpeed
engine) and the memory value shards' (`pretrain.parallel.MemoryParallel`).

The trainer calls `backward` once per micro-batch and `step` once per optimizer step;
the learning rates are set and the skip of a non-finite step applied here only.
The two parameter sets are clipped by separate norms, each to optim.grad_clip: DeepSpeed clips
the dense gradients (its `gradient_clipping`), `clip` the value gradients (their norm is that
of the full tables, all-reduced over the memory group: `MemoryParallel.clip_grad_norm`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.profiler import record_function

from pretrain import profiler_regions as regions
from pretrain.config import OptimConfig
from pretrain.dense_optimizer import set_learning_rate, squared_norm
from pretrain.lr_schedule import value_lr_multiplier

if TYPE_CHECKING:
    from pretrain.parallel import MemoryParallel


@dataclass
class GradNorms:
    values: torch.Tensor  # the value tables' gradient norm, before clipping
    dense: float | None  # measured here where DeepSpeed takes none (ZeRO 0 in fp32); else None

    def finite(self) -> bool:
        """Whether the norms known before the step are finite (under a DeepSpeed wrapper, ZeRO 1-3
        or bf16/fp16, DeepSpeed takes the dense one inside its step: `Optimizers.step` reads it there)."""
        return math.isfinite(float(self.values)) and (self.dense is None or math.isfinite(self.dense))


class Optimizers:
    """Backward, clip, step and zero_grad over the DeepSpeed engine and the value shards."""

    def __init__(self, engine, dense_optimizer, values: MemoryParallel, cfg: OptimConfig):
        self.engine, self.dense_optimizer, self.values = engine, dense_optimizer, values
        self.cfg = cfg
        # ZeRO 0 in fp32: DeepSpeed steps this optimizer itself and takes no norm, so `clip` takes it.
        # A ZeRO or bf16/fp16 wrapper takes it inside its step (and skips a non-finite one): read there,
        # not taken again here (that would add a second pass over the gradients to every step)
        self.measures_dense = engine.optimizer is dense_optimizer
        if not self.measures_dense:  # the wrapper's norm of the step
            dense_optimizer.step_norm = lambda: getattr(engine.optimizer, "_global_grad_norm", None)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        """Accumulate the micro-batch's gradients. DeepSpeed counts micro-steps in its `step()`,
        which updates nothing before the accumulation boundary; the boundary's call is `step`'s."""
        with record_function(regions.BACKWARD):
            self.engine.backward(loss)
        if not last_micro_batch:
            with record_function(regions.MICRO_STEP):
                self.engine.step()

    def clip(self) -> GradNorms:
        """Reduce the value gradients over ranks and clip them; take the dense gradients' norm
        where DeepSpeed does not (ZeRO stage 0 in fp32: one pass over the gradients, every step,
        since a non-finite one skips the step)."""
        assert self.engine.is_gradient_accumulation_boundary()
        self.values.reduce_gradients()
        value_norm = self.values.clip_grad_norm(self.cfg.grad_clip)
        dense = None
        if self.measures_dense:
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            dense = float(squared_norm(grads).sqrt())
        return GradNorms(values=value_norm, dense=dense)

    def step(self, lr_multiplier: float, skip: bool) -> bool:
        """Update both parameter sets with the schedule's `lr_multiplier`, or neither if `skip`;
        the gradients are cleared either way. Returns whether they were updated: not when
        skipped, nor when the dense gradients' global norm, which DeepSpeed's wrapper takes inside
        its step (ZeRO 1-3, bf16/fp16), is not finite (DeepSpeed or `SkippableAdamW` then leaves
        the dense weights alone, and the values are left alone here).

        The schedule is applied here, not by a DeepSpeed scheduler: DeepSpeed does not advance
        its scheduler on steps it skips itself, which would shift the schedule."""
        set_learning_rate(self.engine.optimizer, self.cfg.lr * lr_multiplier)
        self.dense_optimizer.skip = skip
        try:
            self.engine.step()  # the boundary: DeepSpeed clips, steps (unless skipped) and zeroes the dense grads
        finally:
            self.dense_optimizer.skip = False
        norm = self.engine.get_global_grad_norm()
        skip = skip or (norm is not None and not math.isfinite(float(norm)))
        self.values.step(value_lr_multiplier(self.cfg, lr_multiplier), skip=skip)
        self.zero_grad()
        return not skip

    def zero_grad(self) -> None:
        """The value gradients (DeepSpeed zeroes the dense ones at its step)."""
        self.values.zero_grad()

    def dense_grad_norm(self, norms: GradNorms):
        """The dense gradients' norm of the last step: measured in `clip`, else DeepSpeed's."""
        return norms.dense if norms.dense is not None else self.engine.get_global_grad_norm()

    @property
    def has_values(self) -> bool:
        """Whether the model has value tables (a dense model has none)."""
        return bool(self.values.tables)

    def lrs(self, lr_multiplier: float) -> dict[str, float]:
        """The rates of the step: the dense one, and the value tables' where there are any."""
        out = {"train/lr_dense": self.cfg.lr * lr_multiplier}
        if self.has_values:
            out["train/lr_values"] = self.cfg.value_lr * value_lr_multiplier(self.cfg, lr_multiplier)
        return out
