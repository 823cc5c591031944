"""The main job: pretrain configs/tiny.yaml on the embedded fact corpus, on CPU.

`make demo` runs this. It builds the corpus, tokenizer and shards (cached under
data.cache_dir), trains from scratch in `runs/demo` (replaced on each run; pass
`--resume` to continue instead; another `train.run_dir` is replaced only when an earlier
demo wrote it), then prints where the checkpoint, TensorBoard logs and
slot-frequency table are, the loss before and after, and validation loss / fact recall.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path

from pretrain.config import ConfigError, load_config
from pretrain.words import counted

DEFAULT_RUN_DIR = Path("runs/demo")
DEMO_MARK = ".memlayers-demo"  # in a run folder the demo made: it may replace that folder


def replace_refusal(run_dir: Path) -> str | None:
    """Why the demo may not delete `run_dir` to start afresh (None: it may). A user's
    `train.run_dir=runs/english` would otherwise lose a real run's checkpoints."""
    if not run_dir.exists() or run_dir.resolve() == DEFAULT_RUN_DIR.resolve() or (run_dir / DEMO_MARK).exists():
        return None
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        return None
    return (
        f"train.run_dir={run_dir} exists and was not made by the demo, which starts afresh by deleting its "
        "run folder: name a new folder, continue that run with --resume, or train it with python -m pretrain.train"
    )


def continue_command(argv: list[str]) -> str:
    """The command that continues a stopped demo: its own arguments (config, run folder, steps)
    with --resume, less train.stop_after, which would stop the resumed run before its first step.

    A shell runs it as printed whatever the arguments hold (spaces, quotes, `$`): the arguments are
    quoted for the shell of the Makefile's recipe, each `$` doubled for make (which expands `$` in a
    variable's value), and the ARGS=... word quoted for the shell the command is typed into."""
    kept = [arg for arg in argv if arg != "--resume" and not arg.startswith("train.stop_after=")]
    recipe_args = shlex.join(["--resume", *kept]).replace("$", "$$")
    return f"make demo {shlex.quote('ARGS=' + recipe_args)}"


def loss_windows(losses: list[float], size: int = 10) -> tuple[list[float], list[float]]:
    """The first and last `size` losses, each at most half of them, so that the two never share a
    step (a demo shorter than 2 * `size` steps compares its halves; one step alone compares nothing)."""
    n = min(size, len(losses) // 2)
    return (losses[:n], losses[-n:]) if n else ([], [])


def summarise(result, run_dir: Path, max_steps: int, argv: list[str]) -> str:
    head, tail = loss_windows(result.losses)
    if result.step >= max_steps:
        lines = ["", "=== demo finished ==="]
    else:  # a stop signal or train.stop_after: a plain `make demo` would delete this run
        why = "by a signal" if result.stopped_by_signal else "by train.stop_after"
        lines = [
            "",
            f"=== demo stopped at step {result.step} of {max_steps} ({why}) ===",
            f"continue it with {continue_command(argv)} (a plain make demo starts afresh, deleting this run)",
        ]
    if head and tail:
        # a resumed demo's losses are its own steps': the first ones are not the run's
        first_step = result.step - len(result.step_times) + 1
        since = "" if first_step == 1 else f" of this run, from step {first_step}"
        steps = counted(len(head), "step")
        lines.append(
            f"train loss: {sum(head) / len(head):.3f} (first {steps}{since}) -> "
            f"{sum(tail) / len(tail):.3f} (last {steps})"
        )
    ev = result.eval
    if "val_loss" in ev:
        lines.append(f"validation loss {ev['val_loss']:.3f} (perplexity {ev['val_perplexity']:.1f})")
    if "fact_recall" in ev:
        lines.append(f"fact recall {100 * ev['fact_recall']:.1f}% (chance {100 * ev['fact_recall_chance']:.1f}%)")
    lines.append(f"checkpoint:  {result.checkpoint}")
    lines.append(f"slot table:  {result.slot_table}")
    lines.append(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="CPU pretraining demo on the embedded fact corpus")
    parser.add_argument("--config", default="configs/tiny.yaml", help="the run config the demo trains")
    parser.add_argument("--resume", action="store_true", help="continue the previous demo run")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, ["train.run_dir=runs/demo", *args.overrides])
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    run_dir = Path(cfg.train.run_dir)
    if not args.resume:
        refusal = replace_refusal(run_dir)
        if refusal:
            print(f"error: {refusal}", file=sys.stderr)
            return 2
        if run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        (run_dir / DEMO_MARK).write_text("made by `make demo` (pretrain/demo.py), which replaces this folder\n")
    from pretrain.slurm import StopSignal, ctrl_c_abort_in_one_line
    from pretrain.train import train  # with torch and DeepSpeed (seconds): after --help and the refusals above
    from pretrain.trainer import TrainingDiverged

    aborted = ctrl_c_abort_in_one_line(f"continue it with {continue_command(argv)}")  # the second Ctrl-C's line
    try:
        with aborted, StopSignal(ctrl_c=True) as stop:  # Ctrl-C stops with a checkpoint, which --resume continues
            result = train(cfg, stop=stop)
    except TrainingDiverged as err:
        print(f"training stopped: {err}", file=sys.stderr)
        return 1
    except ConfigError as err:  # found at start-up: a resume refused (another schedule or model, ...)
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summarise(result, run_dir, cfg.train.max_steps, argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
