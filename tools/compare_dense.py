"""Quality beside speed: a memory model vs its dense baseline of equal active parameters,
trained on the same tokens (same data order per seed), several seeds each.

Prints validation loss and fact recall (greedy exact match on the synthetic probes, with
its chance level) as mean +- standard deviation over seeds, side by side, and the mean +- sd of the
per-seed difference memory - dense (both models of a seed read the same tokens):

    python tools/compare_dense.py --seeds 0 1 2 --json compare.json
    python tools/compare_dense.py --config configs/tiny.yaml --dense-config configs/tiny_dense.yaml \
        --seeds 0 1 2 train.max_steps=1000
    python tools/compare_dense.py --run-dir runs/cmp --seeds 0 1 2 data.dir=data/english

Each run is the real trainer (the demo's 1000 steps of tiny take ~3 min on 2 cores). The runs are
deleted at the end unless `--run-dir DIR` keeps them, as DIR/memory/seed=S and DIR/dense/seed=S
(`tensorboard --logdir DIR` shows their curves side by side; their checkpoints hold the slot tables).
A run already finished there with the same resolved config (train.run_dir aside: a run folder may be
moved or linked there) is not trained again: its final evaluation is read back from its TensorBoard
events; an unfinished one resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.cli import help_description, output_file, output_folder  # noqa: E402
from pretrain.words import counted  # noqa: E402

METRICS = ("val_loss", "fact_recall", "fact_recall_chance")


def run_one(config: str, seed: int, run_dir: Path, overrides: list[str]) -> dict:
    from pretrain.config import load_config
    from pretrain.distributed import default_deepspeed_accelerator

    cfg = load_config(config, [f"train.seed={seed}", f"train.run_dir={run_dir}", *overrides])
    finished = finished_evaluation(cfg, run_dir)
    if finished is not None:
        return finished
    default_deepspeed_accelerator()  # before DeepSpeed is imported
    from pretrain.train import train

    result = train(cfg)
    if result.stopped_by_signal or result.step < cfg.train.max_steps:
        # a signal ends training early with its last evaluation: not a final result
        raise SystemExit(f"{config} seed {seed} stopped at step {result.step} of {cfg.train.max_steps}; no result")
    return {k: result.eval[k] for k in METRICS if k in result.eval}


def finished_evaluation(cfg, run_dir: Path) -> dict | None:
    """The final evaluation of a run that finished in `run_dir` (`--run-dir`, a second time), read from
    its TensorBoard events, since resuming a finished run trains and evaluates nothing; None where
    the run is not there or not finished. A finished run of another config is refused, naming the keys."""
    from pretrain.checkpoint import latest_checkpoint, step_of
    from pretrain.config import absolute_paths, config_differences
    from pretrain.config.saving import config_to_dict

    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    step = step_of(checkpoint) if checkpoint is not None else None
    if step is None or step < cfg.train.max_steps:
        return None
    from omegaconf import OmegaConf

    # memlayers-submit saves the paths absolute (data.dir, data.cache_dir, ...): both sides are, here
    saved, here = (
        OmegaConf.to_container(absolute_paths(OmegaConf.create(tree), Path.cwd()), resolve=True)
        for tree in (OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")), config_to_dict(cfg))
    )
    # where the run lies is no part of what it trained: a folder moved or linked into the layout is read
    changed = sorted(set(config_differences(saved, here)) - {"train.run_dir"})
    if changed:
        raise SystemExit(
            f"error: {run_dir} holds a finished run of another config (it differs in {', '.join(changed)}): "
            "give --run-dir a new folder, or the config and overrides that run was trained with"
        )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()
    tags = set(board.Tags()["scalars"])
    found = {
        m: next(e.value for e in board.Scalars(f"eval/{m}") if e.step == step)
        for m in METRICS
        if f"eval/{m}" in tags and any(e.step == step for e in board.Scalars(f"eval/{m}"))
    }
    if "val_loss" not in found:
        raise SystemExit(
            f"error: {run_dir} finished at step {step}, but its TensorBoard events hold no eval/val_loss of that "
            "step (train.eval_every=0, or its tensorboard/ folder was removed): give --run-dir a new folder"
        )
    print(f"{run_dir}: finished at step {step}; its final evaluation read from its TensorBoard events", flush=True)
    return found


def paired_differences(memory: list[dict], dense: list[dict], metric: str) -> list[float]:
    """memory - dense of `metric` for each seed where both runs report it."""
    return [m[metric] - d[metric] for m, d in zip(memory, dense) if metric in m and metric in d]


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:  # one value has no spread to show: '+- 0.0000' read as a certain result
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=help_description(__doc__))
    parser.add_argument("--config", default="configs/tiny.yaml", help="the memory model's run config")
    parser.add_argument("--dense-config", default="configs/tiny_dense.yaml", help="the dense baseline's run config")
    parser.add_argument(
        "--seeds", nargs="+", default=["0", "1", "2"], help="integers; key=value overrides may follow them"
    )
    parser.add_argument(
        "--json", type=output_file("compare.json"), default=None, help="also write the results to this JSON file"
    )
    parser.add_argument(
        "--run-dir",
        type=output_folder,
        default=None,
        help="keep the runs as DIR/memory/seed=S and DIR/dense/seed=S (default: a temporary folder, deleted); "
        "runs already finished there are read back, not trained again",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to both configs")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # --seeds takes every word after it: overrides written after the seeds (as above) belong to `overrides`
    seeds = [w for w in args.seeds if "=" not in w]
    args.overrides = args.overrides + [w for w in args.seeds if "=" in w]
    try:
        args.seeds = [int(w) for w in seeds]
    except ValueError:
        parser.error(f"--seeds {' '.join(seeds)}: seeds must be integers")
    if not args.seeds:
        parser.error("--seeds needs at least one integer seed")
    from pretrain.config import load_config
    from pretrain.model import ConfigError

    for config in (args.config, args.dense_config):  # both, before the first run takes minutes
        for seed in dict.fromkeys(args.seeds):  # each: a bad later seed failed after the first runs
            try:
                load_config(config, [f"train.seed={seed}", *args.overrides])
            except ConfigError as err:
                parser.error(f"--seeds {seed}: {err}" if "train.seed" in str(err) else str(err))
    results: dict[str, list[dict]] = {"memory": [], "dense": []}
    with tempfile.TemporaryDirectory(prefix="compare-dense-") as tmp:
        runs = Path(args.run_dir) if args.run_dir is not None else Path(tmp)
        for seed in args.seeds:
            for name, config in (("memory", args.config), ("dense", args.dense_config)):
                results[name].append(run_one(config, seed, runs / name / f"seed={seed}", args.overrides))
                print(
                    f"seed {seed} {name}: " + " ".join(f"{k} {v:.4f}" for k, v in results[name][-1].items()), flush=True
                )
    print(f"\n| model | {' | '.join(METRICS)} |\n|---|" + "---:|" * len(METRICS))
    for name, runs in results.items():
        print(f"| {name} | " + " | ".join(summary([r[m] for r in runs if m in r]) for m in METRICS) + " |")
    # both models of a seed read the same tokens: the per-seed difference leaves out what the seed
    # moves in both (data order), which the spread of each row above keeps
    paired = [paired_differences(results["memory"], results["dense"], m) for m in METRICS]
    print("| memory - dense, per seed | " + " | ".join(summary(d) for d in paired) + " |")
    print(f"({counted(len(args.seeds), 'seed')}; same tokens per seed for both models)")
    if args.run_dir is not None:
        print(f"runs kept in {args.run_dir}: tensorboard --logdir {args.run_dir}")
    if args.json:
        from pretrain.files import atomic_write

        differences = {m: d for m, d in zip(METRICS, paired) if d}
        record = {"seeds": args.seeds, "results": results, "memory_minus_dense": differences}
        atomic_write(args.json, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
