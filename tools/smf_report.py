"""Learning-vs-forgetting report: sparse memory finetuning vs full finetuning vs LoRA.

  memlayers-smf-report                      # pretrain configs/smf_tiny.yaml, export, sweep, plot
  memlayers-smf-report --export DIR --dataset-dir DIR   # sweep an existing export

One command on CPU: pretrains the model on the embedded fact world (or resumes/reuses
<out>/pretrain), exports it with its slot table, finetunes a fresh copy on the held-out
new facts for every setting of the grid (pretrain.smf.experiment.default_grid), and
writes <out>/results.json, <out>/frontier.png and <out>/summary.md. Logic lives in
pretrain.smf.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.cli import output_folder, positive_int  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/smf_tiny.yaml", help="pretraining config (when --export is not given)")
    p.add_argument("--out", default="reports/smf", type=output_folder, help="output folder")
    p.add_argument("--export", default=None, help="use this export instead of pretraining")
    p.add_argument(
        "--dataset-dir",
        default=None,
        help="the export's embedded dataset (new_facts.jsonl, val split); default: the config's",
    )
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs of every run (default: the sweep's, 10)")
    p.add_argument(
        "--batch-size", type=positive_int, default=None, help="rows per step of every run (default: the sweep's, 6)"
    )
    p.add_argument("--eval-every", type=positive_int, default=None, help="evaluate every N epochs (and after the last)")
    p.add_argument(
        "--runs",
        default=None,
        help='JSON list of runs instead of the default grid, e.g. \'[{"method": "sparse", "lr": 10, "top_t": 500}]\'',
    )
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the pretraining config")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    return p.parse_args(argv)


def parse_runs(text: str | None):
    from pretrain.smf.experiment import RunSpec, default_grid
    from pretrain.smf.methods import METHODS

    if text is None:
        return default_grid()
    try:
        items = json.loads(text)
        runs = [RunSpec(**item) for item in items]
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"--runs must be a JSON list of objects with method, lr, top_t, lora_rank, epochs, max_grad_norm ({err})"
        ) from None
    if not runs:  # crashed in the frontier plot after the pretraining/loading
        raise ValueError(
            f'--runs {text} lists no run: give at least one, e.g. \'[{{"method": "sparse", "lr": 10, "top_t": 500}}]\', '
            "or leave --runs out for the default grid"
        )
    for run in runs:
        problem = run_spec_problem(run, METHODS)
        if problem:
            raise ValueError(f"--runs: {run}: {problem}")
    return runs


def run_spec_problem(run, methods) -> str | None:
    """What is wrong with one --runs entry (checked before any pretraining), or None."""

    def number(x) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    if run.method not in methods:
        return f"method must be one of {methods}"
    if not number(run.lr) or run.lr <= 0:
        return "lr must be a number > 0"
    for name in ("top_t", "lora_rank", "epochs"):
        value = getattr(run, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"{name} must be an integer >= 0 (0: the sweep's default)"
    if not number(run.max_grad_norm) or run.max_grad_norm < 0:
        return "max_grad_norm must be a number >= 0 (0: no clipping)"
    return None


def check_counts_slots(cfg) -> None:
    """Sparse runs rank slots against the pretraining run's slot table: refuse, before pretraining,
    a config that would count none."""
    if not (cfg.model.memory.enabled and cfg.slots.enabled):
        why = "has no memory layers" if not cfg.model.memory.enabled else "sets slots.enabled=false"
        raise ValueError(
            f"the pretraining config {why}, so its export would hold no slot table, which the sparse runs "
            "rank against: pretrain with memory layers and slots.enabled=true, or leave sparse runs out of --runs"
        )


def pretrained_export(cfg, out: Path) -> Path:
    """Train (or resume, or reuse a finished) run in <out>/pretrain and export it to <out>/export."""
    from pretrain.export import export_checkpoint
    from pretrain.train import train

    result = train(cfg)  # resumes an interrupted run; returns at once when it is already finished
    metrics = " ".join(f"{k} {v:.4g}" for k, v in result.eval.items())
    print(f"pretrained model: step {result.step} {metrics}".rstrip(), flush=True)
    return export_checkpoint(cfg.train.run_dir, out / "export", force=True, show_progress=False)


def main(argv=None) -> int:
    args = parse_args(argv)
    from pretrain.config import ConfigError, load_config
    from pretrain.data import DataError, prepare_embedded_dataset
    from pretrain.export import ExportError
    from pretrain.files import atomic_write
    from pretrain.smf.experiment import (
        SweepSettings,
        check_data_config_for_export,
        check_dataset_for_pretraining,
        load_sweep_inputs,
        run_sweep,
    )
    from pretrain.smf.frontier import compare, plot_frontier, summary_markdown

    out = Path(args.out)
    try:
        runs = parse_runs(args.runs)
        settings = SweepSettings()
        if args.epochs is not None:
            settings.epochs = args.epochs
        for name in ("epochs", "batch_size", "eval_every"):
            if getattr(args, name) is not None:
                if getattr(args, name) <= 0:
                    raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
                setattr(settings, name, getattr(args, name))
        sparse = any(run.method == "sparse" for run in runs)
        cfg = None
        if args.export is None or args.dataset_dir is None:
            cfg = load_config(args.config, [f"train.run_dir={out / 'pretrain'}", *args.overrides])
        if args.export is None and sparse:
            check_counts_slots(cfg)
        if args.export is not None and args.dataset_dir is None:  # before a dataset is built for it
            check_data_config_for_export(args.export, cfg.data)
        if args.export is None and args.dataset_dir is not None:  # before pretraining
            check_dataset_for_pretraining(args.dataset_dir, cfg.data)
        dataset_dir = (
            Path(args.dataset_dir) if args.dataset_dir else prepare_embedded_dataset(cfg.data, cfg.data.seq_len)
        )
        new_facts = dataset_dir / "new_facts.jsonl"
        if not new_facts.is_file():
            raise DataError(
                f"{new_facts} does not exist: the report needs the embedded fact world's held-out facts "
                "(leave data.dir empty, data.synthetic.new_fact_fraction > 0)"
            )
        if args.export is None:
            out.mkdir(parents=True, exist_ok=True)
        export = Path(args.export) if args.export else pretrained_export(cfg, out)
        # the export, its slot table and the data, checked before the first run
        inputs = load_sweep_inputs(export, [new_facts], dataset_dir, with_table=sparse)
        out.mkdir(parents=True, exist_ok=True)
    except (ConfigError, DataError, ExportError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = run_sweep(inputs, runs, settings, out / "results.json")
    verdict = compare(report)
    report["verdict"] = verdict
    atomic_write(out / "results.json", json.dumps(report, indent=1) + "\n")
    plot_frontier(report, out / "frontier.png")
    summary = summary_markdown(report, verdict)
    atomic_write(out / "summary.md", summary)
    print(summary)
    print(f"wrote {out / 'results.json'}, {out / 'frontier.png'}, {out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
