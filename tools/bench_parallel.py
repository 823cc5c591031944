"""CPU step time, per-rank memory and bytes communicated per step: memory parallel P = 1 vs P > 1.

python tools/bench_parallel.py                              # W=2: P=1 vs P=2, 16K slots x 256
python tools/bench_parallel.py --n-keys 1024 --configs 2:2 --steps 10   # 1M slots, P=2
python tools/bench_parallel.py --json bench_parallel.json   # also every rank's record, each step's time
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernels.benchmark import write_results  # noqa: E402
from pretrain.bench.parallel import (  # noqa: E402
    BenchSpec,
    check_configs,
    format_report,
    relative_step_times,
    run_bench,
)
from pretrain.cli import output_file, positive_int  # noqa: E402
from pretrain.spawn import RankFailed  # noqa: E402


def parse_configs(text: str) -> list[tuple[int, int]]:
    """argparse type of --configs: comma-separated world size:P pairs of positive integers."""
    pairs = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(
                f"{text!r}: {item!r} is not a world size:P pair of positive integers; e.g. 2:1,2:2 "
                f"(world size:memory-parallel size)"
            )
        pairs.append((int(parts[0]), int(parts[1])))
    return pairs


def build_parser() -> argparse.ArgumentParser:
    spec = BenchSpec()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {
        "n_keys": "sub-keys per half of the memory (N = n_keys^2 slots)",
        "v_dim": "memory value dimension",
        "dim": "model dimension",
        "n_layers": "transformer layers",
        "heads": "memory heads",
        "k": "slots each head reads per token",
        "global_batch": "sequences per step over all ranks",
        "seq_len": "tokens per sequence",
        "steps": "timed steps per configuration",
    }
    for field, text in helps.items():
        ap.add_argument("--" + field.replace("_", "-"), type=positive_int, default=getattr(spec, field), help=text)
    ap.add_argument(
        "--zero-stage",
        type=int,
        choices=(0, 1, 2, 3),
        default=spec.zero_stage,
        help="DeepSpeed ZeRO stage of the dense weights",
    )
    ap.add_argument("--configs", type=parse_configs, default="2:1,2:2", help="world size:P pairs, comma separated")
    ap.add_argument(
        "--json", type=output_file("bench_parallel.json"), default=None, help="also write every rank's record here"
    )
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    spec = BenchSpec(**{f: getattr(args, f) for f in BenchSpec.__dataclass_fields__})
    try:
        check_configs(spec, args.configs)
    except ValueError as err:
        ap.error(str(err))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        records = run_bench(spec, args.configs)
    except RankFailed as err:  # one line: the rank that failed and its error
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"N={spec.n_keys**2} slots, v_dim={spec.v_dim}, global batch {spec.global_batch} x {spec.seq_len} "
        f"tokens, ZeRO {spec.zero_stage}"
    )
    print(format_report(records))
    if args.json:
        write_results(args.json, "cpu", vars(args), records=records, relative=relative_step_times(records))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
