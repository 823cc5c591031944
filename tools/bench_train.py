"""CPU training throughput: the tiny memory model vs its dense baseline, side by side.

Runs the real trainer (DeepSpeed engine, value pool, slot counters) in this process on
the embedded corpus, alternating the two configs for several rounds so both see the same
machine load, and reports median tokens/s of each and their ratio.

    python tools/bench_train.py --steps 20 --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pretrain.config import load_config  # noqa: E402
from pretrain.train import train  # noqa: E402

WARMUP_STEPS = 3


def measure(config: str, overrides: list[str], steps: int, run_dir: Path) -> list[float]:
    """Seconds per step of a fresh run (the first steps excluded as warm-up)."""
    cfg = load_config(config, [f"train.run_dir={run_dir}", f"train.max_steps={steps + WARMUP_STEPS}",
                               "train.eval_every=100000", "train.checkpoint_every=100000",
                               "train.log_every=100000", *overrides])
    result = train(cfg)
    return result.step_times[WARMUP_STEPS:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-config", default="configs/tiny.yaml")
    parser.add_argument("--dense-config", default="configs/tiny_dense.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="write the raw numbers here")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to both configs")
    args = parser.parse_args(argv)

    times: dict[str, list[float]] = {"memory": [], "dense": []}
    configs = {"memory": args.memory_config, "dense": args.dense_config}
    tokens_per_step = {}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for round_index in range(args.rounds):
            for name, config in configs.items():
                run_dir = Path(tmp) / f"{name}-{round_index}"
                times[name] += measure(config, args.overrides, args.steps, run_dir)
                cfg = load_config(config, args.overrides)
                tokens_per_step[name] = cfg.train.global_batch * cfg.data.seq_len
                print(f"round {round_index + 1}/{args.rounds} {name}: "
                      f"median {statistics.median(times[name]) * 1e3:.1f} ms/step", flush=True)
    report = {}
    for name in configs:
        median = statistics.median(times[name])
        report[name] = {"median_step_s": median, "tokens_per_s": tokens_per_step[name] / median,
                        "steps_measured": len(times[name])}
    report["memory_over_dense_time"] = report["memory"]["median_step_s"] / report["dense"]["median_step_s"]
    print(f"\n{'model':8} {'ms/step':>9} {'tokens/s':>10}")
    for name in configs:
        r = report[name]
        print(f"{name:8} {r['median_step_s'] * 1e3:9.1f} {r['tokens_per_s']:10,.0f}")
    print(f"memory / dense step time: {report['memory_over_dense_time']:.2f}x "
          f"(same active parameters; threads: {os.environ.get('OMP_NUM_THREADS', 'default')})")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
