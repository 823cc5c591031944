"""A PNG report of a slot table: sorted counts on log-log axes, coverage over steps."""

from __future__ import annotations

from pathlib import Path

from pretrain.files import save_figure
from pretrain.slots.table import SlotTable


def render_report(table: SlotTable, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_counts, ax_cov) = plt.subplots(1, 2, figsize=(11, 4.2))
    for layer in table.layers:
        counts = table.counts[layer].sort(descending=True).values
        used = counts[counts > 0].double()
        if len(used):
            ax_counts.loglog(range(1, len(used) + 1), used.numpy(), label=layer)
        if "step" in table.history:
            steps = table.history["step"].numpy()
            ax_cov.plot(
                steps, table.history[f"{layer}.used"].double().numpy() / table.num_slots, label=f"{layer} cumulative"
            )
            ax_cov.plot(
                steps,
                table.history[f"{layer}.interval_used"].double().numpy() / table.num_slots,
                linestyle="--",
                label=f"{layer} per interval",
            )
    ax_counts.set(xlabel="slot rank", ylabel="accesses", title=f"sorted slot counts (step {table.step})")
    ax_cov.set(xlabel="step", ylabel="fraction of slots used", ylim=(0, 1.02), title="coverage")
    if "step" not in table.history:
        ax_cov.text(0.5, 0.5, "no coverage history in this table", ha="center", transform=ax_cov.transAxes)
    for ax in (ax_counts, ax_cov):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"{table.path.name}: {table.num_slots} slots, {table.num_tokens} tokens, "
        f"{table.num_documents} {table.granularity} units"
    )
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)
