"""What a run will do, in numbers, before it starts: tokens, epochs over each source, parameters
and training FLOPs. Printed by the trainer at start and by `memlayers-submit`, so that a run that
would read a small corpus many times over is seen before hours in the queue, not after.

Counts only (no time estimate: that depends on the machine; tools/bench_train.py measures it).
Epochs are the expected number of passes over a source's training split at the current weights
(`data.sources`): each row of a batch is drawn from source i with probability w_i / sum(w).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model.accounting import config_parameters, flops_per_token, human_count

# Beyond about 4 passes, repeated tokens are worth markedly less than fresh ones (Muennighoff
# et al., "Scaling Data-Constrained Language Models", 2023).
MANY_EPOCHS = 4.0


@dataclass
class RunPlan:
    steps: int
    sequences_per_step: int
    seq_len: int
    active_parameters: int
    total_parameters: int
    flops_per_token: float
    epochs: dict[str, float]  # source name -> expected passes over its training split

    @property
    def tokens(self) -> int:
        return self.steps * self.sequences_per_step * self.seq_len

    @property
    def training_flops(self) -> float:
        return self.flops_per_token * self.tokens


def training_plan(cfg, sources: list) -> RunPlan:
    """The plan of `cfg`'s whole run (train.max_steps) over `sources` (checked `Source`s; [] when
    the data is not prepared yet: no epochs then)."""
    counts = config_parameters(cfg.model)
    t = cfg.train
    sequences = t.max_steps * t.global_batch
    total_weight = sum(s.weight for s in sources)
    epochs = {s.name: sequences * s.weight / total_weight / s.train_sequences for s in sources}
    return RunPlan(
        steps=t.max_steps,
        sequences_per_step=t.global_batch,
        seq_len=cfg.data.seq_len,
        active_parameters=counts.active,
        total_parameters=counts.total,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len)["total"],
        epochs=epochs,
    )


def describe_plan(plan: RunPlan, note_repeats: bool = True) -> list[str]:
    """Log lines: the plan, and (`note_repeats`) a note for each source read more than MANY_EPOCHS
    times; the embedded fact world is meant to be read many times (its facts are memorised)."""
    per_source = "; ".join(f"{name} {n:.2f} epochs" for name, n in plan.epochs.items())
    lines = [
        f"plan: {plan.steps} steps x {plan.sequences_per_step} sequences x {plan.seq_len} tokens = "
        f"{human_count(plan.tokens)} tokens{' (' + per_source + ')' if per_source else ''}; "
        f"{human_count(plan.active_parameters)} active of {human_count(plan.total_parameters)} parameters, "
        f"{plan.tokens / plan.active_parameters:.3g} tokens per active parameter; "
        f"{plan.training_flops:.3g} training FLOPs"
    ]
    for name, n in plan.epochs.items() if note_repeats else ():
        if n > MANY_EPOCHS:
            lines.append(
                f"plan: {name} is read {n:.1f} times over; beyond ~{MANY_EPOCHS:g} epochs repeated tokens are "
                "worth markedly less than fresh ones: add data, lower its weight or train.max_steps"
            )
    return lines
