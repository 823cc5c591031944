"""The learning-rate schedule, and whether a resumed run may change it.

`lr_multiplier(step)` scales optim.lr for the optimizer step `step` (0-based, the step about
to be taken):

- warm-up: (step + 1) / optim.warmup_steps while step < warmup_steps;
- stable: 1 until the decay begins;
- decay: over the last `decay_steps` = round(optim.decay_fraction * train.max_steps) steps
  (at most the steps after warm-up), from 1 towards optim.min_lr_ratio, shaped by
  optim.decay_shape: cosine, linear, or sqrt (1 - sqrt(progress), the cool-down of Hägele
  et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations");
  `none` keeps 1 (a constant rate after warm-up).

decay_fraction = 1 (the default) decays from the end of warm-up: the classic cosine schedule.
decay_fraction < 1 is warmup-stable-decay (WSD): until its decay begins, a run can be
extended (a larger train.max_steps on resume) without changing any step already taken.

`check_resumed_schedule` is that rule: a resume whose schedule gives any step already taken
another learning rate is refused, unless optim.allow_schedule_change says it is deliberate.
Its messages number steps as the training log, the checkpoints and train.stop_after do: the
optimizer step `step` is step `step + 1` there (`logged_step`).
"""

from __future__ import annotations

import math

from pretrain.config import OptimConfig, RunConfig
from pretrain.model.config import ConfigError
from pretrain.words import counted

DECAY_SHAPES = {
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - progress,
    "sqrt": lambda progress: 1.0 - math.sqrt(progress),
}

# The settings that decide a step's learning rates (dense and values).
SCHEDULE_KEYS = (
    "train.max_steps",
    "optim.lr",
    "optim.value_lr",
    "optim.value_lr_schedule",
    "optim.warmup_steps",
    "optim.min_lr_ratio",
    "optim.decay_shape",
    "optim.decay_fraction",
)


def decay_steps(cfg: OptimConfig, max_steps: int) -> int:
    """How many of the last steps decay: decay_fraction of max_steps, at most those after warm-up."""
    after_warmup = max(0, max_steps - cfg.warmup_steps)
    return after_warmup if cfg.decay_fraction >= 1.0 else min(after_warmup, round(cfg.decay_fraction * max_steps))


def decay_start(cfg: OptimConfig, max_steps: int) -> int | None:
    """The first step of the decay (its rate is still the peak; the next is below it); None without a decay."""
    return None if cfg.decay_shape == "none" else max_steps - decay_steps(cfg, max_steps)


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The factor on optim.lr for optimizer step `step` (see the module docstring)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    start = decay_start(cfg, max_steps)
    if start is None or step < start:
        return 1.0
    progress = min(1.0, (step - start) / max(1, max_steps - start))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * DECAY_SHAPES[cfg.decay_shape](progress)


def value_lr_multiplier(cfg: OptimConfig, dense_multiplier: float) -> float:
    """The value pool follows the dense schedule, or keeps optim.value_lr fixed."""
    return 1.0 if cfg.value_lr_schedule == "constant" else dense_multiplier


def learning_rates(step: int, cfg: RunConfig) -> tuple[float, float]:
    """(dense lr, value lr) of optimizer step `step` under `cfg`."""
    multiplier = lr_multiplier(step, cfg.optim, cfg.train.max_steps)
    return cfg.optim.lr * multiplier, cfg.optim.value_lr * value_lr_multiplier(cfg.optim, multiplier)


def logged_step(step: int) -> int:
    """The number the training log gives the 0-based optimizer step `step` (its count after it)."""
    return step + 1


def first_difference(old: RunConfig, new: RunConfig, steps_taken: int) -> int | None:
    """The first of the steps 0..steps_taken-1 whose learning rates differ between the two
    configs (relative 1e-9), or None when they agree on all of them."""
    for step in range(steps_taken):
        for a, b in zip(learning_rates(step, old), learning_rates(step, new)):
            if not math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0):
                return step
    return None


def check_resumed_schedule(old: RunConfig, new: RunConfig, steps_taken: int, where: str) -> str | None:
    """Refuse (ConfigError) a resume at `steps_taken` whose schedule gives a step already taken
    another learning rate than `old` (the config the checkpoint `where` was trained with) did;
    return a line for the log when the schedule changed, None when it did not."""
    changed = [key for key in SCHEDULE_KEYS if _get(old, key) != _get(new, key)]
    if not changed:
        return None
    listed = ", ".join(f"{key} {_get(old, key)} -> {_get(new, key)}" for key in changed)
    step = first_difference(old, new, steps_taken)
    if step is None:
        start = decay_start(new.optim, new.train.max_steps)
        begins = "no decay" if start is None else f"its decay begins at step {logged_step(start)}"
        return f"schedule changed ({listed}); it agrees with the {counted(steps_taken, 'step')} taken, {begins}"
    (old_dense, old_value), (new_dense, new_value) = learning_rates(step, old), learning_rates(step, new)
    dense_changed = not math.isclose(old_dense, new_dense, rel_tol=1e-9, abs_tol=0.0)
    which, old_lr, new_lr = ("lr", old_dense, new_dense) if dense_changed else ("value lr", old_value, new_value)
    difference = (
        f"step {logged_step(step)} took {which} {old_lr:.8g} under the config of {where}, {new_lr:.8g} under this one"
    )
    if new.optim.allow_schedule_change:
        return f"schedule changed ({listed}) on purpose (optim.allow_schedule_change): {difference}"
    old_start = decay_start(old.optim, old.train.max_steps)
    hint = ""
    if dense_changed and old_start is not None and old_start < steps_taken:  # a decay moved, not value_lr
        hint = f"; a run extends without such a change only until its decay begins (step {logged_step(old_start)} here)"
        if old.optim.decay_fraction >= 1.0:
            hint += ": train with optim.decay_fraction<1 (warmup-stable-decay) to keep that possible"
    raise ConfigError(
        f"resuming at step {steps_taken} with another learning-rate schedule ({listed}): {difference}{hint}. "
        "Resume with the checkpoint's values, or set optim.allow_schedule_change=true if the change is deliberate"
    )


def _get(cfg: RunConfig, key: str):
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)
