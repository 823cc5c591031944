"""The training log's lines: the progress line and scalars of each logging interval, the data
line at start-up, the tokens drawn per source, and the slot-usage statistics; written through a
`pretrain.metrics.MetricsLogger` (TensorBoard on rank 0 and the console).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pretrain.distributed import global_sums
from pretrain.metrics import MetricsLogger, mfu
from pretrain.slots.summary import usage_lines

if TYPE_CHECKING:
    from pretrain.config import RunConfig
    from pretrain.train_state import TrainState


def log_progress(
    metrics: MetricsLogger,
    cfg: RunConfig,
    state: TrainState,
    loss: float | None,
    loss_mean: float | None,
    lrs: dict,
    grad_norm,
    value_grad_norm,
    tokens_per_s: float | None,
    step_time: float,
    flops_per_token: float,
    peak_flops: float | None,
    world_size: int,
    memory_bytes: int,
    tokens_by_source: dict | None = None,
    data_wait: list[float] | None = None,
    z_loss: float | None = None,
) -> None:
    """TensorBoard scalars and the one-line console summary of the last logging interval.
    `loss`: the interval's last step's, None when that step was skipped (no train/loss is
    logged under it, rather than an earlier step's); `loss_mean`: the mean over the interval's
    applied steps (None if it has none). `tokens_per_s`: None for an interval of
    the run's first step alone (its time is perf/first_step_time_s). `memory_bytes`: the
    interval's peak (pretrain.peak_memory.IntervalPeak).

    `data_wait`: each rank's fraction of the interval spent waiting for batches; the largest is
    logged with its rank (the input pipeline that holds the others back, if any)."""
    utilisation = mfu(flops_per_token, tokens_per_s, world_size, peak_flops) if tokens_per_s is not None else None
    scalars = {
        "train/loss": loss,
        "train/loss_mean": loss_mean,
        **lrs,
        "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
        "train/value_grad_norm": float(value_grad_norm) if value_grad_norm is not None else None,
        "perf/tokens_per_s": tokens_per_s,
        "perf/step_time_s": step_time,
        "perf/mfu": utilisation,
        "perf/memory_bytes": memory_bytes,  # the interval's peak
        "train/tokens_seen": state.tokens_seen,
    }
    if z_loss is not None:
        scalars["train/z_loss"] = z_loss  # the log(Z)^2 term, before its weight optim.z_loss
    if tokens_by_source:
        scalars.update({f"data/tokens_seen/{name}": n for name, n in tokens_by_source.items()})
    waits = ""
    if data_wait:
        slowest = max(range(len(data_wait)), key=data_wait.__getitem__)
        scalars["perf/data_wait_fraction"] = data_wait[slowest]
        scalars["perf/data_wait_slowest_rank"] = slowest
        waits = f" data {_fmt(data_wait[slowest], percent=True)}" + (f" (rank {slowest})" if len(data_wait) > 1 else "")
    metrics.scalars(scalars, state.step)
    metrics.line(
        f"step {state.step}/{cfg.train.max_steps} loss {'skipped' if loss is None else f'{loss:.4f}'} "
        f"lr {scalars['train/lr_dense']:.2e} grad_norm {_fmt(scalars['train/grad_norm'])} "
        f"tok/s {'n/a' if tokens_per_s is None else f'{tokens_per_s:,.0f}'} mfu {_fmt(utilisation, percent=True)}{waits}"
    )


def describe_data(cfg: RunConfig, sources: list, tokenizer) -> str:
    """One log line: the sources with their share, the tokenizer and the model's vocabulary."""
    total = sum(s.weight for s in sources)
    parts = [f"{s.name} ({s.dir}, {s.train_sequences} train sequences, weight {s.weight / total:.3f})" for s in sources]
    padding = cfg.model.vocab_size - tokenizer.vocab_size
    vocab = f"model.vocab_size {cfg.model.vocab_size}" + (f" ({padding} rows beyond the tokenizer)" if padding else "")
    return f"data: {'; '.join(parts)}; tokenizer {tokenizer.vocab_size} tokens, {vocab}, seq_len {cfg.data.seq_len}"


def tokens_seen_per_source(loader) -> dict[str, int] | None:
    """Training tokens drawn from each source, summed over ranks (a collective); None for one source."""
    counts = getattr(loader, "tokens_per_source", None)
    if counts is None:
        return None
    counts = counts()
    if len(counts) < 2:
        return None
    return dict(zip(counts, global_sums(list(counts.values()))))


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.3f}"


def log_slot_statistics(stats, metrics: MetricsLogger, step: int) -> None:
    """Slot usage over all ranks, cumulative and since the last call (a collective): TensorBoard
    scalars and histograms, and a console line per counter printing those scalars."""
    reduced = stats.reduce(close_interval=True)
    scalars = reduced.summary(interval=True)
    metrics.scalars(scalars, step)
    for line in usage_lines(scalars, reduced.layer_names, *reduced.last_interval()):
        metrics.line(line)
    for name, hist in reduced.histograms().items():
        metrics.histogram(name, hist, step)
