"""The sweep's frontier: a plot (learning vs forgetting) and the comparison the issue asks for.

Points are (run, epoch) pairs. Learning = new-fact recall; forgetting = the drop in
old-fact recall from the pretrained model (percentage points), and the rise in
validation loss. `compare` takes full finetuning's best-learning point as the reference
(recall F, drop D) and, for each other method, the least-forgetting point that learns
within `margin` of F; sparse memory finetuning meets the bar when its drop <= D / 3. The verdict
is undecided when full finetuning learned nothing the probes tell from noise (`new_fact_learning`: F
not a count of hits a one-sided binomial test tells from the pretrained model's recall), and when
the pretrained model knows too little beyond guessing for forgetting to be measured
(`old_fact_knowledge`).
"""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

from pretrain.files import save_figure

# Recalls are fractions of probes (k / n) and the drops their differences: a point exactly at
# a bound (10 points below, a third of the drop) may land a rounding error on either side of it.
BOUNDARY_SLACK = 1e-9  # far below one probe of any probe set (1 / n)
GUESSING_TEST_LEVEL = 0.01  # one-sided exact binomial test: recall told from guessing

COLORS = {"sparse": "tab:blue", "full": "tab:red", "lora": "tab:green"}
NAMES = {"sparse": "sparse memory finetuning", "full": "full finetuning", "lora": "LoRA"}


def points(report: dict) -> list[dict]:
    """Every (run, epoch) with learning and forgetting measured against the pretrained model."""
    before = report["before"]
    out = []
    for run in report["runs"]:
        for h in run["history"]:
            if "new_fact_recall" not in h:
                continue  # an epoch without evaluation
            p = {
                "method": run["method"],
                "label": run["label"],
                "epoch": h["epoch"],
                "new_fact_recall": h["new_fact_recall"],
            }
            if "old_fact_recall" in h:
                p["old_fact_drop"] = before["old_fact_recall"] - h["old_fact_recall"]
            if "val_loss" in h:
                p["val_loss_rise"] = h["val_loss"] - before["val_loss"]
            out.append(p)
    return out


def require_old_fact_recall(report: dict) -> None:
    """Raise ValueError when the sweep measured no forgetting (no old-fact recall), which the
    verdict and the plot are about."""
    if "old_fact_recall" not in report["before"]:
        raise ValueError(
            "the sweep measured no old-fact recall: the probes hold no trained-fact probe (is_new_fact "
            "false), so forgetting, which the verdict and the frontier compare, is unknown; use the "
            "export's probes.jsonl with the trained facts (the embedded corpus writes both)"
        )


def binomial_critical_count(n: int, p: float, alpha: float = GUESSING_TEST_LEVEL) -> int:
    """The fewest hits out of `n` that a one-sided exact binomial test tells from guessing at chance `p`:
    the smallest k with P(Binomial(n, p) >= k) <= alpha (n + 1 when even n hits are not enough)."""
    if p <= 0:
        return 1
    if p >= 1:
        return n + 1
    below = 0.0  # P(X < k)
    for k in range(n + 1):
        if 1.0 - below <= alpha:
            return k
        log_pmf = math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        below += math.exp(log_pmf + k * math.log(p) + (n - k) * math.log1p(-p))
    return n + 1


def old_fact_knowledge(before: dict, forgetting_ratio: float, alpha: float = GUESSING_TEST_LEVEL) -> dict | None:
    """Whether the pretrained model knows enough old facts beyond guessing for forgetting to be measured.

    It can forget at most what it recalls above chance, `excess` = hits - n * chance (in probes), and
    the bar lets sparse finetuning forget `forgetting_ratio` of full finetuning's drop; so that share of
    the excess must itself be a count the probes tell from guessing: at least critical - n * chance, with
    `critical` the fewest hits a one-sided exact binomial test at level `alpha` tells from chance. The
    chance is the probes' mean: by Hoeffding (1956) the binomial at the mean chance has the heavier upper
    tail than the true count's (a sum of unequal Bernoullis) from one hit above the mean on, so
    `critical` errs on the strict side.
    None when the report predates these fields (`old_fact_probes`, `old_fact_chance`)."""
    n, chance = before.get("old_fact_probes"), before.get("old_fact_chance")
    if not n or chance is None:
        return None
    hits = round(before["old_fact_recall"] * n)
    expected = n * chance
    critical = binomial_critical_count(n, chance, alpha)
    needed = (critical - expected) / forgetting_ratio if forgetting_ratio > 0 else math.inf
    return {
        "probes": n,
        "hits": hits,
        "chance": chance,
        "excess": hits - expected,
        "critical_hits": critical,
        "excess_needed": needed,
        "hits_needed": math.ceil(expected + needed - BOUNDARY_SLACK) if math.isfinite(needed) else n + 1,
        "measurable": hits - expected >= needed - BOUNDARY_SLACK,
    }


def new_fact_learning(before: dict, best_recall: float, alpha: float = GUESSING_TEST_LEVEL) -> dict:
    """Whether a best new-fact recall is learning the probes tell from the pretrained model's recall.

    The null is a model that learned nothing: each of the n new-fact probes answered right at the
    pretrained model's rate, or at chance where that is higher; learning takes at least the fewest hits a
    one-sided exact binomial test at level `alpha` tells from that rate. A report from before the
    probes were counted (no `new_fact_probes`) takes any gain as learning."""
    n, start = before.get("new_fact_probes"), before["new_fact_recall"]
    if not n:
        return {"learned": best_recall - start > BOUNDARY_SLACK}
    rate = max(start, before["new_fact_chance"])
    critical = binomial_critical_count(n, rate, alpha)
    hits = round(best_recall * n)
    return {"probes": n, "hits": hits, "null_rate": rate, "critical_hits": critical, "learned": hits >= critical}


def compare(report: dict, margin: float = 0.10, forgetting_ratio: float = 1 / 3) -> dict:
    require_old_fact_recall(report)
    pts = [p for p in points(report) if "old_fact_drop" in p]
    full = [p for p in pts if p["method"] == "full"]
    if not full:
        return {"reference": None, "methods": {}, "sparse_meets_bar": None}
    ref = max(full, key=lambda p: (p["new_fact_recall"], -p["old_fact_drop"]))
    verdict = {"reference": ref, "margin": margin, "forgetting_ratio": forgetting_ratio, "methods": {}}
    for method in sorted({p["method"] for p in pts} - {"full"}):
        floor = ref["new_fact_recall"] - margin - BOUNDARY_SLACK
        ok = [p for p in pts if p["method"] == method and p["new_fact_recall"] >= floor]
        best = (
            min(ok, key=lambda p: p["old_fact_drop"])
            if ok
            else max((p for p in pts if p["method"] == method), key=lambda p: p["new_fact_recall"])
        )
        verdict["methods"][method] = {
            "point": best,
            "learns_within_margin": bool(ok),
            "forgets_at_most_ratio": best["old_fact_drop"]
            <= forgetting_ratio * max(ref["old_fact_drop"], 0.0) + BOUNDARY_SLACK,
        }
    sparse = verdict["methods"].get("sparse")
    verdict["sparse_meets_bar"] = (
        None if sparse is None else sparse["learns_within_margin"] and sparse["forgets_at_most_ratio"]
    )
    learning = new_fact_learning(report["before"], ref["new_fact_recall"])
    verdict["new_fact_learning"] = learning
    knowledge = old_fact_knowledge(report["before"], forgetting_ratio)
    if knowledge is not None:
        verdict["old_fact_knowledge"] = knowledge
    if sparse is not None and knowledge is not None and not knowledge["measurable"]:
        # a model that knew (almost) nothing forgets (almost) nothing, whatever the method: every
        # drop is then within the probes' noise, and "a third of full's" says nothing
        n, k = knowledge["probes"], knowledge
        share = Fraction(forgetting_ratio).limit_denominator(100)
        verdict["sparse_meets_bar"] = None
        margin = (
            f"only {k['excess']:.1f} probes beyond guessing, so the forgetting the bar allows sparse finetuning "
            f"({share} of that, {forgetting_ratio * k['excess']:.1f} probes) is below the "
            f"{k['critical_hits'] - n * k['chance']:.1f} probes above chance that {n} probes tell from guessing "
            f"({k['critical_hits']} hits: one-sided exact binomial test at the {100 * GUESSING_TEST_LEVEL:g}% level)"
            if k["excess"] > 0
            else "no more than guessing would"  # a negative excess and a negative allowance read as nonsense
        )
        verdict["undecided"] = (
            f"no verdict can be given: the pretrained model recalls {k['hits']} of {n} old-fact probes "
            f"({100 * k['hits'] / n:.1f}%; chance {100 * k['chance']:.1f}%, {n * k['chance']:.1f} probes), {margin}; "
            f"forgetting cannot be measured on facts the model never learnt: pretrain longer (train.max_steps) until "
            f"old-fact recall reaches {k['hits_needed']} of {n} ({100 * k['hits_needed'] / n:.1f}%)"
        )
    elif sparse is not None and not learning["learned"]:
        # the bar is set by full finetuning's learning: without any, a method that learns nothing
        # and forgets nothing would "meet" it; nor does a gain of a probe or two within the noise set one
        before = report["before"]
        told = (
            f" ({learning['hits']} of {learning['probes']} probes, below the {learning['critical_hits']} that a "
            f"one-sided exact binomial test at the {100 * GUESSING_TEST_LEVEL:g}% level tells from a recall of "
            f"{100 * learning['null_rate']:.1f}%: the pretrained model's, or chance ({100 * before['new_fact_chance']:.1f}%) "
            "where higher)"
            if "probes" in learning
            else ""
        )
        verdict["sparse_meets_bar"] = None
        verdict["undecided"] = (
            f"full finetuning learned nothing (best new-fact recall {100 * ref['new_fact_recall']:.1f}%{told}, "
            f"pretrained {100 * before['new_fact_recall']:.1f}%), so there is no learning to match: "
            "finetune longer (--epochs) or at a higher learning rate"
        )
    return verdict


def plot_frontier(report: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    require_old_fact_recall(report)
    pts = points(report)
    has_val = any("val_loss_rise" in p for p in pts)
    fig, axes = plt.subplots(1, 2 if has_val else 1, figsize=(12 if has_val else 6.5, 5), squeeze=False)
    panels = [("old_fact_drop", "drop in old-fact recall (points)", 100.0)]
    if has_val:
        panels.append(("val_loss_rise", "rise in validation loss (nats)", 1.0))
    for ax, (key, ylabel, scale) in zip(axes[0], panels):
        for label in dict.fromkeys(p["label"] for p in pts):
            run = [p for p in pts if p["label"] == label and key in p]
            if not run:
                continue
            color = COLORS.get(run[0]["method"], "gray")
            xs = [100 * p["new_fact_recall"] for p in run]
            ys = [scale * p[key] for p in run]
            ax.plot(xs, ys, "-", color=color, alpha=0.35, lw=1)
            ax.plot(xs[-1], ys[-1], "o", color=color, ms=5)
            ax.annotate(
                label.split(" ", 1)[1],
                (xs[-1], ys[-1]),
                fontsize=6,
                alpha=0.7,
                xytext=(3, 2),
                textcoords="offset points",
            )
        ax.set_xlabel("new-fact recall (%) — learning")
        ax.set_ylabel(f"{ylabel} — forgetting")
        ax.axhline(0, color="black", lw=0.5)
        ax.grid(alpha=0.3)
    handles = [
        plt.Line2D([], [], marker="o", color=color, label=NAMES[method])
        for method, color in COLORS.items()
        if any(p["method"] == method for p in pts)
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=9, frameon=False)
    before = report["before"]
    fig.suptitle(
        f"Learning vs forgetting on the fact world (pretrained: old-fact recall "
        f"{100 * before['old_fact_recall']:.1f}%, new {100 * before['new_fact_recall']:.1f}%; "
        f"lines = epochs, dot = last)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return save_figure(fig, path, dpi=130)


def _settings_text(settings: dict) -> str:
    """The sweep settings; `epochs` is only the default of runs that set none (a run label's "40ep")."""
    text = ", ".join(f"{k} {v}" for k, v in settings.items() if k != "epochs")
    if "epochs" in settings:
        text = f"epochs {settings['epochs']} unless the run's label gives its own, " + text
    return text


def _chance_text(before: dict) -> str:
    if "old_fact_chance" not in before:  # a report from before 2026-12-07
        return ""
    return f" (chance {100 * before['old_fact_chance']:.1f}%, {before['old_fact_probes']} probes)"


def summary_markdown(report: dict, verdict: dict) -> str:
    before = report["before"]
    lines = [
        "# Sparse memory finetuning: learning vs forgetting",
        "",
        f"Pretrained model: new-fact recall {100 * before['new_fact_recall']:.1f}%, old-fact recall "
        f"{100 * before.get('old_fact_recall', float('nan')):.1f}%{_chance_text(before)}, validation loss "
        f"{before.get('val_loss', float('nan')):.3f}. Finetuning set: {report['finetune_rows']} rows, "
        f"{report['finetune_tokens']} tokens; {_settings_text(report['settings'])}.",
        "",
        "| run | new-fact recall | old-fact recall | val loss | seconds |",
        "|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        last = run["history"][-1]
        lines.append(
            f"| {run['label']} | {100 * last['new_fact_recall']:.1f}% | "
            f"{100 * last.get('old_fact_recall', float('nan')):.1f}% | {last.get('val_loss', float('nan')):.3f} "
            f"| {run['seconds']:.0f} |"
        )
    ref = verdict.get("reference")
    if ref:
        lines += [
            "",
            f"Reference (full finetuning, best learning): {ref['label']} epoch {ref['epoch']}: new-fact "
            f"recall {100 * ref['new_fact_recall']:.1f}%, old-fact drop {100 * ref['old_fact_drop']:.1f} points.",
        ]
        for method, v in verdict["methods"].items():
            p = v["point"]
            lines.append(
                f"- {NAMES.get(method, method)}: {p['label']} epoch {p['epoch']}: new-fact recall "
                f"{100 * p['new_fact_recall']:.1f}% ({'within' if v['learns_within_margin'] else 'NOT within'} "
                f"{100 * verdict['margin']:.0f} points), old-fact drop {100 * p['old_fact_drop']:.1f} points "
                f"({'at most' if v['forgets_at_most_ratio'] else 'more than'} 1/3 of full's)."
            )
        lines.append("")
        if verdict.get("undecided"):
            lines.append(f"Sparse memory finetuning meets the bar: **undecided**: {verdict['undecided']}.")
        else:
            meets = "yes" if verdict["sparse_meets_bar"] else "no"
            lines.append(f"Sparse memory finetuning meets the bar: **{meets}**.")
    return "\n".join(lines) + "\n"
