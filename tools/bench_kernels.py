"""Benchmark the memory-layer kernels against their PyTorch baselines (see kernels/benchmark.py
for the bytes model). Without a GPU only the PyTorch paths are timed, at smaller shapes.

  python tools/bench_kernels.py --json out.json            # paper shapes on CUDA
  python tools/bench_kernels.py --configs --json c.json    # every launch candidate; winners to pin
  python tools/bench_kernels.py --layer configs/memory_373m.yaml --json l.json  # whole memory layer
  python tools/bench_kernels.py --sweep --plot sweep.png   # product-key vs brute force

A row whose p80/p20 exceeds 1.15 is timed again (up to --reruns times); the steadiest
attempt is reported, with every attempt's percentiles in the JSON ("attempts").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kernels import benchmark as kb  # noqa: E402
from pretrain.bench.memory_kernels import (  # noqa: E402
    autotuned_configs,
    bench_launch_configs,
    bench_shapes,
    shape_steps,
    steady_timer,
)
from pretrain.cli import (  # noqa: E402
    image_file,
    int_at_least,
    non_negative_number,
    output_file,
    positive_int,
    refuse_one_file_for_two_outputs,
)
from pretrain.files import save_figure  # noqa: E402

DTYPES = kb.DTYPES


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=positive_int, default=8 * 4096 if cuda else 256, help="T (paper: 8x4096)")
    p.add_argument("--heads", type=positive_int, default=4, help="memory heads (H)")
    p.add_argument("--k", type=positive_int, default=32, help="slots each head reads per token (k)")
    p.add_argument(
        "--n-keys", type=positive_int, default=1024 if cuda else 256, help="sub-keys per half (N = n_keys^2 slots)"
    )
    p.add_argument("--k-dim", type=positive_int, default=256, help="key dimension (k_dim)")
    p.add_argument("--v-dims", type=positive_int, nargs="+", default=[1024, 2048], help="value dimensions to time")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the tensors")
    p.add_argument("--repeats", type=positive_int, default=20 if cuda else 5, help="timed calls per case")
    p.add_argument("--json", type=output_file("bench_kernels.json"), default=None, help="write all results here")
    p.add_argument("--sweep", action="store_true", help="scale n_keys 64..1024: product-key vs brute force")
    p.add_argument("--sweep-tokens", type=positive_int, default=256 if cuda else 64, help="tokens (T) of the --sweep")
    p.add_argument(
        "--index-skew",
        type=non_negative_number("0 = the scoring's"),
        default=0.0,
        help="bag rows drawn from a Zipf law with this exponent over all slots (hot slots, as in a "
        "trained memory) instead of the slots the scoring selects; 0 = the scoring's",
    )
    p.add_argument(
        "--row-chunks",
        type=positive_int,
        nargs="*",
        default=[],
        help="also time the sorted bag backward with these kernels.bag_triton.ROW_CHUNK values "
        "(the most entries one program reduces; hot rows are split into such chunks)",
    )
    p.add_argument(
        "--key-chunks",
        type=positive_int,
        nargs="*",
        default=[],
        help="also time the Triton scoring backward with these kernels.pkm_bwd_triton.KEY_CHUNK values",
    )
    p.add_argument(
        "--configs",
        action="store_true",
        help="time every launch candidate of each autotuned kernel at these shapes and print the "
        "steady winners as kernels/launch_configs.py PINNED entries",
    )
    p.add_argument(
        "--layer",
        type=Path,
        default=None,
        metavar="CONFIG",
        help="whole MemoryPlus layer and whole-model forward+backward of this config, Triton vs "
        "PyTorch path (batch train.micro_batch x data.seq_len unless --layer-batch/--layer-seq)",
    )
    p.add_argument(
        "--layer-batch",
        type=int_at_least(0, "0: the config's"),
        default=0,
        help="sequences for --layer (0: the config's micro_batch)",
    )
    p.add_argument(
        "--layer-seq",
        type=int_at_least(0, "0: the config's"),
        default=0,
        help="sequence length for --layer (0: the config's seq_len)",
    )
    p.add_argument(
        "--layer-compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--layer: also the whole model compiled as train.compile compiles it, against eager",
    )
    p.add_argument("--reruns", type=int_at_least(0), default=2, help="extra timings of a row whose p80/p20 > 1.15")
    p.add_argument("--plot", type=image_file("sweep.png"), default="bench_kernels_sweep.png", help="PNG for --sweep")
    return p


def parse_args(argv):
    p = build_parser()
    args = p.parse_args(argv)
    if args.layer is not None and not args.layer.is_file():
        p.error(f"--layer {args.layer}: no such config file (e.g. configs/memory_373m.yaml)")
    if args.k > args.n_keys or args.k_dim % 2:
        p.error("need --k <= --n-keys and an even --k-dim")
    plotted = args.sweep and not args.configs and args.layer is None  # the plot is the sweep's
    refuse_one_file_for_two_outputs(p, **{"--json": args.json, "--plot": args.plot if plotted else None})
    return args


def bench_layer(args, device, rows: list | None = None) -> list[dict]:
    """--layer: pretrain.bench.layer on this config, rows printed (and saved) as they are measured."""
    from pretrain.bench.layer import bench_layer as run

    try:
        return run(
            args.layer,
            device,
            args.dtype,
            steady_timer(device, args.repeats, args.reruns),
            StreamedRows() if rows is None else rows,
            batch=args.layer_batch,
            seq=args.layer_seq,
            say=tqdm.write,
            compiled=args.layer_compile,
        )
    except ValueError as err:
        raise SystemExit(f"--layer {err}") from None


UNSTEADY = kb.UNSTEADY


def format_row(r: dict) -> str:
    def f(key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"

    line = (
        f"{r['name']:32s} {r['v_dim']:>6d} {f('p20', '9.3f')} {f('p50', '9.3f')} {f('p80', '9.3f')} "
        f"{f('gb_s', '8.1f')} {f('pct_peak', '6.1f')} {f('tflop_s', '8.2f')} {f('speedup', '8.2f')}"
    )
    notes = [r["note"]] if r.get("note") else []
    attempts = r.get("attempts") or []
    if len(attempts) > 1:
        notes.append(
            f"timed {len(attempts)} times (p80/p20 of each: "
            + ", ".join(f"{a['p80'] / a['p20']:.2f}" for a in attempts)
            + "); the steadiest is shown"
        )
    if r["p80"] > UNSTEADY * r["p20"]:
        notes.append(
            f"unsteady: p80 is {r['p80'] / r['p20']:.2f}x p20 (bimodal or disturbed); rerun before quoting p50"
        )
    return line + "".join(f"\n    note: {n}" for n in notes)


TABLE_HEADER = (
    f"{'kernel':32s} {'v_dim':>6s} {'p20':>9s} {'p50':>9s} {'p80':>9s} {'GB/s':>8s} {'%peak':>6s} "
    f"{'TFLOP/s':>8s} {'speedup':>8s}   (ms; speedup vs the PyTorch row above it)"
)


class StreamedRows(list):
    """Result rows, each printed as it is measured and handed to `save` (the rows so far), so a
    run cut short (a gpu_check stage's time limit) keeps what came before, in the log and in the JSON."""

    def __init__(self, save=None):
        super().__init__()
        self.save = save

    def append(self, row: dict) -> None:
        if not self:
            tqdm.write(TABLE_HEADER)
        if "p20" in row:  # not a derived row (a layer's unattributed rest), which bench_layer says itself
            tqdm.write(format_row(row))
        super().append(row)
        if self.save is not None:
            self.save(list(self))

    def extend(self, rows) -> None:
        for row in rows:
            self.append(row)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = kb.device_info(device)
    payload = {}  # the JSON's sections; kb.write_results adds the run's info and the options ("settings")

    def save_partial(**sections) -> None:
        """Rewrite --json with the sections measured so far, marked incomplete ("complete": false),
        so a run stopped half-way (gpu_check's stage limit) returns what it measured."""
        if args.json:
            kb.write_results(args.json, device, vars(args), **payload, **sections, complete=False)

    def saving(section: str) -> StreamedRows:
        return StreamedRows(lambda rows: save_partial(**{section: rows}))

    if device.type != "cuda":
        print("no CUDA device: timing the PyTorch paths only; Triton timing skipped")
        payload["triton_skipped"] = True
    if args.configs:
        if device.type != "cuda":
            print("--configs needs a CUDA device (the interpreter runs one fixed launch)")
            return 2
        payload.update(bench_launch_configs(args, device, save_partial))
    elif args.layer is not None:
        payload["layer"] = bench_layer(args, device, saving("layer"))
    elif args.sweep:
        n_list = [64, 128, 256, 512, 1024]
        with tqdm(total=len(n_list), desc="sweep") as bar:
            rows = kb.sweep_scoring(
                args.sweep_tokens, args.heads, args.k, args.k_dim, n_list, device, args.repeats, bar
            )
        payload["sweep"] = rows
        print(f"{'n_keys':>7s} {'slots':>9s} {'product-key us/tok':>19s} {'brute-force us/tok':>19s} {'ratio':>7s}")
        for r in rows:
            print(
                f"{r['n_keys']:7d} {r['slots']:9d} {r['product_key_us_per_token']:19.2f} "
                f"{r['brute_force_us_per_token']:19.2f} {r['brute_over_product']:7.1f}"
            )
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        slots = [r["slots"] for r in rows]
        ax.loglog(slots, [r["product_key_us_per_token"] for r in rows], "o-", label="product keys")
        ax.loglog(slots, [r["brute_force_us_per_token"] for r in rows], "s-", label="brute force")
        ax.set_xlabel("slots N"), ax.set_ylabel("us per token"), ax.legend(), ax.set_title(info["device"])
        fig.tight_layout()
        save_figure(fig, args.plot)
        print(f"plot written to {args.plot}")
    else:
        with tqdm(total=shape_steps(args), desc="kernels") as bar:
            rows = bench_shapes(args, device, info, bar, saving("results"))
        payload["results"] = rows
        if device.type == "cuda":
            from kernels import launch_configs

            payload["autotuned"] = autotuned_configs()
            payload["pinned_hits"] = launch_configs.PINNED_HITS
            for name, chosen in payload["autotuned"].items():
                for key, config in chosen.items():
                    print(f"autotuned {name} {key}: {config}")
        print(f"device: {info['device']} (SKU {info['sku']}, peak {info['peak_tbs']} TB/s)")
    if args.json:
        kb.write_results(args.json, device, vars(args), **payload, complete=True)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
