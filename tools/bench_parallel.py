"""CPU step time, per-rank memory and bytes communicated per step: memory parallel P = 1 vs P > 1.

python tools/bench_parallel.py                              # W=2: P=1 vs P=2, 16K slots x 256
python tools/bench_parallel.py --n-keys 1024 --configs 2:2 --steps 10   # 1M slots, P=2
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.parallel.bench import BenchSpec, format_report, run_bench  # noqa: E402


def parse_configs(text: str) -> list[tuple[int, int]]:
    try:
        return [tuple(int(x) for x in item.split(":")) for item in text.split(",")]
    except ValueError:
        raise SystemExit(f"--configs {text!r} must look like 2:1,2:2 (world size:memory-parallel size)") from None


def main(argv=None) -> None:
    spec = BenchSpec()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in ("n_keys", "v_dim", "dim", "n_layers", "heads", "k", "global_batch", "seq_len", "steps", "zero_stage"):
        ap.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(spec, field))
    ap.add_argument("--configs", default="2:1,2:2", help="world size:P pairs, comma separated")
    args = ap.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    spec = BenchSpec(**{f: getattr(args, f) for f in spec.__dataclass_fields__})
    records = run_bench(spec, parse_configs(args.configs))
    print(
        f"N={spec.n_keys**2} slots, v_dim={spec.v_dim}, global batch {spec.global_batch} x {spec.seq_len} "
        f"tokens, ZeRO {spec.zero_stage}"
    )
    print(format_report(records))


if __name__ == "__main__":
    main()
