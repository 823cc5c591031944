"""Value-pool cost vs pool size: dense (adamw) vs row-sparse (sparse_adamw), one process (CPU).

  python tools/bench_values.py                       # N = 4K, 64K, 1M, 16.7M slots, v_dim 64; PNG
  python tools/bench_values.py --n-keys 64,256 --layer-n-keys 256   # quick look
  PYTHONPATH=/tmp/pkm python tools/bench_values.py    # + lucidrains' product-key-memory 0.3.0
  python tools/bench_values.py --device cuda --v-dim 1024 --batch 16 --seq-len 2048 --n-keys 256,1024,2048 \
      --dense-max-slots 4194304 --layer-n-keys 0          # GPU, the paper's v_dim and a large batch

Prints a full training step's median time and memory per N and variant, the
sparse/dense ratios, then one memory layer's forward+backward against
product-key-memory 0.3.0 when it is importable (never a project dependency: install it
with `pip install --no-deps --target /tmp/pkm ...`, see --help of the layer section).
The 16.7M-slot pool with v_dim 64 holds 4.3 GB of values + 8.6 GB of Adam moments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.bench.values import (
    PKM_INSTALL,
    SPARSE_VARIANTS,
    VARIANTS,
    LayerSpec,
    StepSpec,
    available_bytes,
    layer_compare,
    pool_bytes,
    step_sweep,
)
from pretrain.cli import image_file, int_at_least, positive_int
from pretrain.files import atomic_write, save_figure
from pretrain.words import counted

MIB = 2**20


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    step, layer = StepSpec(), LayerSpec()
    p.add_argument("--n-keys", default=",".join(map(str, step.n_keys)), help="comma-separated n_keys (N = n_keys^2)")
    helps = {
        "v_dim": "memory value dimension",
        "dim": "model dimension",
        "heads": "memory heads",
        "k": "slots each head reads per token",
        "k_dim": "key dimension",
        "batch": "sequences per step",
        "seq_len": "tokens per sequence",
        "micro_batches": "backward passes accumulated per step",
        "repeats": "timed steps per case",
    }
    for name, text in helps.items():
        p.add_argument("--" + name.replace("_", "-"), type=positive_int, default=getattr(step, name), help=text)
    p.add_argument(
        "--dense-max-slots",
        type=int_at_least(0),
        default=step.dense_max_slots,
        help="the dense adamw variant only up to this many slots (it needs another N x v_dim gradient)",
    )
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help="comma-separated value optimizers to compare (all are built per N: at 16.7M slots x v_dim 64 "
        "sparse_adamw holds 12.3 GB, sparse_rowwise_adamw 8.3 GB, with :bf16 6.2 GB)",
    )
    p.add_argument(
        "--layer-n-keys",
        type=int_at_least(0, "0 skips it"),
        default=layer.n_keys,
        help="pool of the layer comparison; 0 skips it",
    )
    p.add_argument("--layer-dim", type=positive_int, default=layer.dim, help="model dimension of the layer comparison")
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="cuda: Triton kernels, CUDA allocator memory (the layer comparison stays on CPU)",
    )
    p.add_argument(
        "--threads",
        type=int_at_least(0, "0: torch's default"),
        default=0,
        help="torch threads (0: torch's default); 1 steadies a shared machine",
    )
    p.add_argument(
        "--plot",
        type=lambda text: Path(image_file("bench_values.png")(text)),
        default=Path("bench_values.png"),
        help="the PNG; the JSON (device, date, commit, every record with its raw timings) beside it as .json",
    )
    return p


def parse_args(argv):
    p = build_parser()
    return p.parse_args(argv)


def format_sweep(records: list[dict]) -> str:
    lines = [
        (
            f"{'slots':>10} {'variant':>25} {'rows read':>9} {'step ms':>9} {'cpu ms':>8} {'peak MiB':>9} "
            f"{'step-alloc MiB':>14} {'resident MiB':>12}"
        )
    ]
    for r in records:
        lines.append(
            f"{r['slots']:>10} {r['variant']:>25} {r['rows_read']:>9} {1e3 * r['step_s']:>9.1f} "
            f"{1e3 * r['step_cpu_s']:>8.1f} {r['step_peak'] / MIB:>9.0f} {r['step_extra'] / MIB:>14.0f} "
            f"{r['resident'] / MIB:>12.0f}"
        )
    by = {(r["slots"], r["variant"]): r for r in records}
    for slots in sorted({r["slots"] for r in records}):
        for variant in SPARSE_VARIANTS:
            d, s = by.get((slots, "adamw")), by.get((slots, variant))
            if d and s:
                alloc = f"{s['step_extra'] / d['step_extra']:.2f}x" if d["step_extra"] else "n/a (dense allocated none)"
                lines.append(
                    f"N={slots}: {variant}/adamw step time {s['step_s'] / d['step_s']:.2f}x (cpu "
                    f"{s['step_cpu_s'] / d['step_cpu_s']:.2f}x), peak memory "
                    f"{s['step_peak'] / d['step_peak']:.2f}x, step allocation {alloc}"
                )
    for variant in SPARSE_VARIANTS:
        sparse = sorted((r["slots"], r["step_cpu_s"]) for r in records if r["variant"] == variant)
        if len(sparse) > 1:
            lines.append(
                f"{variant} step cpu time relative to the smallest N: "
                + ", ".join(f"N={n}: {t / sparse[0][1]:.2f}x" for n, t in sparse)
            )
            if 65536 in dict(sparse):
                lines.append(
                    f"{variant} step cpu time {sparse[-1][0]} / 65536 slots: {sparse[-1][1] / dict(sparse)[65536]:.2f}x"
                )
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for variant, color in zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        rows = sorted((r["slots"], r) for r in records if r["variant"] == variant)
        if not rows:
            continue
        n = [slots for slots, _ in rows]
        a.loglog(n, [1e3 * r["step_cpu_s"] for _, r in rows], "o-", color=color, label=f"{variant}: cpu")
        a.loglog(n, [1e3 * r["step_s"] for _, r in rows], "o:", color=color, alpha=0.5, label=f"{variant}: wall")
        b.loglog(n, [r["step_peak"] / MIB for _, r in rows], "o-", color=color, label=f"{variant}: peak")
        b.loglog(
            n,
            [max(r["step_extra"] / MIB, 0.1) for _, r in rows],
            "s--",
            color=color,
            label=f"{variant}: step allocation (floor 0.1)",
        )
    a.set(xlabel="value slots N", ylabel="training step (ms)", title="step time (median)")
    b.set(xlabel="value slots N", ylabel="MiB", title="memory")
    a.legend(fontsize=8), b.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from kernels.benchmark import run_info

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        n_keys = tuple(int(x) for x in args.n_keys.split(","))
    except ValueError:
        raise SystemExit(f"--n-keys {args.n_keys!r} must be comma-separated integers, e.g. 64,256,1024") from None
    variants = tuple(args.variants.split(","))
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    spec = StepSpec(
        n_keys=n_keys,
        variants=variants,
        **{
            k: getattr(args, k)
            for k in (
                "v_dim",
                "dim",
                "heads",
                "k",
                "k_dim",
                "batch",
                "seq_len",
                "micro_batches",
                "repeats",
                "dense_max_slots",
                "device",
            )
        },
    )
    free = available_bytes(spec.device)
    too_large = [n for n in n_keys if pool_bytes(spec, n) > free]
    if too_large:  # the variants of one N are built side by side: an out-of-memory error would come
        # only at that N, minutes in, and lose every record measured before it
        n = too_large[0]
        raise SystemExit(
            f"--n-keys {n}: the value pools of --variants {','.join(variants)} at {n * n} slots x v_dim "
            f"{spec.v_dim} hold {pool_bytes(spec, n) / 2**30:.1f} GiB together, more than the "
            f"{free / 2**30:.1f} GiB free on {spec.device}; drop {n} from --n-keys, or name fewer --variants "
            f"(adamw is left out above --dense-max-slots)"
        )
    print(
        f"full training step: {counted(spec.micro_batches, 'micro-batch', 'micro-batches')} of {spec.batch} x {spec.seq_len} "
        f"tokens, dim {spec.dim}, v_dim {spec.v_dim}, "
        f"{spec.heads} heads x k={spec.k}, median of {spec.repeats}, {counted(torch_threads(), 'thread')}",
        flush=True,
    )
    records = step_sweep(
        spec,
        progress=lambda r: print(
            f"  N={r['slots']} {r['variant']}: {1e3 * r['step_s']:.0f} ms", file=sys.stderr, flush=True
        ),
    )
    print(format_sweep(records))
    plot(records, args.plot)
    payload = {
        **run_info(torch.device(spec.device)),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "threads": torch_threads(),
        "records": records,
    }
    json_path = args.plot.with_suffix(".json")
    atomic_write(json_path, json.dumps(payload, indent=1))
    print(f"wrote {args.plot} and {json_path}")
    if args.layer_n_keys:
        layer = LayerSpec(n_keys=args.layer_n_keys, dim=args.layer_dim)
        print(
            f"\none memory layer, forward+backward: N={layer.n_keys**2}, dim = value dim {layer.dim}, "
            f"batch {layer.batch} x {layer.seq_len}, {layer.heads} heads x k={layer.k}, k_dim {layer.k_dim}"
        )
        rows = layer_compare(layer)
        payload["layer"] = rows
        atomic_write(json_path, json.dumps(payload, indent=1))
        for r in rows:
            print(f"  {r['layer']:>26}: {1e3 * r['fwd_bwd_s']:8.1f} ms wall, {1e3 * r['fwd_bwd_cpu_s']:8.1f} ms cpu")
        by = {r["layer"]: r for r in rows}
        if "product-key-memory 0.3.0" in by:
            s, p = by["memlayers sparse"], by["product-key-memory 0.3.0"]
            print(
                f"  memlayers sparse / product-key-memory: {s['fwd_bwd_s'] / p['fwd_bwd_s']:.2f}x wall, "
                f"{s['fwd_bwd_cpu_s'] / p['fwd_bwd_cpu_s']:.2f}x cpu"
            )
        else:
            print(f"  product-key-memory is not importable; to compare: {PKM_INSTALL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
