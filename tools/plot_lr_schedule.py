"""Plot a config's learning-rate schedule (dense and values) before a long run.

  python tools/plot_lr_schedule.py --config configs/memory_373m.yaml optim.decay_fraction=0.2 \
      [--out lr_schedule.png]
  memlayers-plot-lr-schedule --config configs/tiny.yaml optim.decay_shape=sqrt

Writes a PNG with the warm-up end and the decay start marked, and prints where they fall.
Steps are numbered as the training log numbers them, from 1 to train.max_steps.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.cli import image_file  # noqa: E402
from pretrain.config import RunConfig, load_config  # noqa: E402
from pretrain.files import save_figure  # noqa: E402
from pretrain.lr_schedule import decay_start, decay_steps, learning_rates, logged_step  # noqa: E402
from pretrain.model import ConfigError  # noqa: E402


def describe(cfg: RunConfig) -> str:
    o, steps = cfg.optim, cfg.train.max_steps
    start, n_decay = decay_start(o, steps), decay_steps(o, steps)
    if start is None:
        decay = "no decay (constant after warm-up)"
    elif n_decay == 0:
        why = (
            "no step is left after warm-up"
            if o.warmup_steps >= steps
            else f"{o.decay_fraction:g} x {steps} rounds to 0"
        )
        decay = f"no {o.decay_shape} decay ({why})"
    elif n_decay == 1:  # a decay's first step still runs at the peak
        decay = f"no {o.decay_shape} decay (its one step, {logged_step(start)}, runs at the peak lr)"
    else:
        decay = f"{o.decay_shape} decay over steps {logged_step(start)}..{steps} to lr x {o.min_lr_ratio:g}"
    values = "constant" if o.value_lr_schedule == "constant" else "the same shape"
    if not o.warmup_steps:
        warmup = f"no warm-up (lr {o.lr:g} from step 1)"
    elif o.warmup_steps > steps:
        warmup = (
            f"warm-up over all {steps} steps, ending at lr {o.lr * steps / o.warmup_steps:g}: the peak lr {o.lr:g} "
            f"is never reached (optim.warmup_steps={o.warmup_steps} > train.max_steps={steps})"
        )
    else:
        warmup = f"warm-up over steps 1..{o.warmup_steps} to lr {o.lr:g}"
    return f"{steps} steps: {warmup}, {decay}; values at {o.value_lr:g}, {values}"


def plot_schedule(cfg: RunConfig, out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [logged_step(step) for step in range(cfg.train.max_steps)]
    dense, values = zip(*(learning_rates(step, cfg) for step in range(cfg.train.max_steps)))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(steps, dense, label="dense (optim.lr)")
    ax.plot(steps, values, label="values (optim.value_lr)", linestyle="--")
    if 0 < cfg.optim.warmup_steps <= cfg.train.max_steps:  # a later end would stretch the axis past the run
        ax.axvline(cfg.optim.warmup_steps, color="gray", lw=0.8, linestyle=":", label="warm-up ends")
    start = decay_start(cfg.optim, cfg.train.max_steps)
    if start is not None and start > cfg.optim.warmup_steps and decay_steps(cfg.optim, cfg.train.max_steps) > 1:
        ax.axvline(logged_step(start), color="black", lw=0.8, linestyle=":", label="decay begins")
    ax.set(xlabel="optimizer step", ylabel="learning rate", ylim=(0, None), title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, dpi=110)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.add_argument(
        "--out",
        default="lr_schedule.png",
        type=image_file("lr_schedule.png"),
        help="the image to write (PNG; or a suffix matplotlib writes: .pdf, .svg...)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        parser.error(str(err))
    print(describe(cfg))
    o = cfg.optim
    kind = (
        "constant"
        if o.decay_shape == "none"
        else "no decay"
        if decay_steps(o, cfg.train.max_steps) <= 1
        else f"{o.decay_shape} decay"
        if o.decay_fraction >= 1
        else "warmup-stable-decay"
    )
    print(f"wrote {plot_schedule(cfg, args.out, f'{args.config}: {kind}, {cfg.train.max_steps} steps')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
