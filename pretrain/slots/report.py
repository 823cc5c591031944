"""A PNG report of a slot table: sorted counts on log-log axes, coverage over steps, and the
concentration of each interval's accesses (top-1% share, KL from uniform) over steps."""

from __future__ import annotations

from pathlib import Path

from pretrain.files import save_figure
from pretrain.slots.locate import TABLE_FILENAME
from pretrain.slots.table import SlotTable


def render_report(table: SlotTable, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_counts, ax_cov, ax_top) = plt.subplots(1, 3, figsize=(16, 4.2))
    ax_kl = ax_top.twinx()
    history = table.history
    for layer in table.layers:
        counts = table.counts[layer].sort(descending=True).values
        used = counts[counts > 0].double()
        if len(used):
            ax_counts.loglog(range(1, len(used) + 1), used.numpy(), label=layer)
        if "step" not in history:
            continue
        steps = history["step"].numpy()
        ax_cov.plot(steps, history[f"{layer}.used"].double().numpy() / table.num_slots, label=f"{layer} cumulative")
        ax_cov.plot(
            steps,
            history[f"{layer}.interval_used"].double().numpy() / table.num_slots,
            linestyle="--",
            label=f"{layer} per interval",
        )
        if f"{layer}.interval_top1pct_share" in history:
            (line,) = ax_top.plot(
                steps, history[f"{layer}.interval_top1pct_share"].numpy(), label=f"{layer} top-1% share"
            )
            ax_kl.plot(
                steps,
                history[f"{layer}.interval_kl_uniform"].numpy(),
                linestyle=":",
                color=line.get_color(),
                label=f"{layer} KL",
            )
    first = int(table.metadata.get("first_step", "0")) + 1  # a run that turned the statistics on at a resume
    counted = f"step {table.step}" if first == 1 else f"steps {first}-{table.step}"
    ax_counts.set(xlabel="slot rank", ylabel="accesses", title=f"sorted slot counts ({counted})")
    ax_cov.set(xlabel="step", ylabel="fraction of slots used", ylim=(0, 1.02), title="coverage")
    ax_top.set(xlabel="step", ylabel="share of accesses of the top 1% of slots", ylim=(0, 1.02))
    ax_top.set_title("concentration per interval")
    ax_kl.set(ylabel="KL from uniform (nats, dotted)", ylim=(0, None))
    if "step" not in history:
        ax_cov.text(0.5, 0.5, "no coverage history in this table", ha="center", transform=ax_cov.transAxes)
    if not any(k.endswith(".interval_top1pct_share") for k in history):
        ax_top.text(0.5, 0.5, "no concentration history in this table", ha="center", transform=ax_top.transAxes)
    for ax in (ax_counts, ax_cov):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    # one legend for both axes of the concentration panel, on the twin: drawn after ax_top, its
    # lines would otherwise cover a legend of ax_top's
    top_lines, top_labels = ax_top.get_legend_handles_labels()
    kl_lines, kl_labels = ax_kl.get_legend_handles_labels()
    if top_lines or kl_lines:
        ax_kl.legend(top_lines + kl_lines, top_labels + kl_labels, fontsize=8)
    # every table has the same file name: the folder holding it names the run (and checkpoint)
    source = table.path.parent if table.path.name == TABLE_FILENAME else table.path
    fig.suptitle(
        f"{source}: {table.num_slots:,} slots, {table.num_tokens:,} tokens, "
        f"{table.num_documents:,} {table.granularity} units"
    )
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)
