"""Benchmark the memory-layer kernels against their PyTorch baselines (see kernels/benchmark.py
for the bytes model). Without a GPU only the PyTorch paths are timed, at smaller shapes.

  python tools/bench_kernels.py --json out.json            # paper shapes on CUDA
  python tools/bench_kernels.py --sweep --plot sweep.png   # product-key vs brute force
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kernels import benchmark as kb  # noqa: E402
from kernels import reference  # noqa: E402
from pretrain.files import atomic_write  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8 * 4096 if cuda else 256, help="T (paper: 8x4096)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--n-keys", type=int, default=1024 if cuda else 256)
    p.add_argument("--k-dim", type=int, default=256)
    p.add_argument("--v-dims", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--repeats", type=int, default=20 if cuda else 5)
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument("--sweep", action="store_true", help="scale n_keys 64..1024: product-key vs brute force")
    p.add_argument("--sweep-tokens", type=int, default=256 if cuda else 64)
    p.add_argument("--index-skew", type=float, default=0.0,
                   help="bag rows drawn from a Zipf law with this exponent over all slots (hot slots, as in a "
                        "trained memory) instead of the slots the scoring selects; 0 = the scoring's")
    p.add_argument("--scoring-configs", action="store_true",
                   help="time the fused scoring forward under several (BLOCK_T, BLOCK_N, num_warps) launches")
    p.add_argument("--plot", type=Path, default=Path("bench_kernels_sweep.png"), help="PNG for --sweep")
    args = p.parse_args(argv)
    for key in ("tokens", "heads", "k", "n_keys", "k_dim", "repeats"):
        if getattr(args, key) <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if args.index_skew < 0:
        p.error("--index-skew must be >= 0")
    if args.k > args.n_keys or args.k_dim % 2:
        p.error("need --k <= --n-keys and an even --k-dim")
    return args


def bench_shapes(args, device, info, progress) -> list[dict]:
    use_triton = device.type == "cuda"
    if use_triton:
        from kernels import bag_triton, pkm_triton
    rows, peak, reps = StreamedRows(), info["peak_tbs"], args.repeats
    dtype = DTYPES[args.dtype]
    for v_dim in args.v_dims:
        s = kb.Shape(args.tokens, args.heads, args.k, args.n_keys, args.k_dim, v_dim, dtype)
        q, k1, k2, values = kb.make_inputs(s, device)
        shape = {"tokens": s.tokens, "heads": s.heads, "k": s.k, "n_keys": s.n_keys, "k_dim": s.k_dim,
                 "v_dim": v_dim, "dtype": args.dtype}
        with torch.no_grad():
            weights, indices = reference.pkm_topk(q, k1, k2, s.k)
        if args.index_skew > 0:
            indices = kb.zipf_indices(indices.shape, s.n_keys**2, args.index_skew, device)
            shape["index_skew"] = args.index_skew
        stats = kb.row_stats(indices)
        sb, fl = kb.scoring_bytes(s), kb.scoring_flops(s)
        if v_dim == args.v_dims[0]:  # scoring does not depend on the value dim
            with torch.no_grad():
                t = kb.time_ms(lambda: reference.pkm_topk(q, k1, k2, s.k), device, reps)
            base = kb.percentiles(t)["p50"]
            rows.append(kb.record("scoring_fwd_torch", t, sb, peak, fl, **shape))
            if use_triton:
                with torch.no_grad():
                    t = kb.time_ms(lambda: pkm_triton.pkm_topk(q, k1, k2, s.k), device, reps)
                rows.append(kb.record("scoring_fwd_triton", t, sb, peak, fl, base, **shape))
            qg, k1g, k2g = (x.detach().requires_grad_() for x in (q, k1, k2))
            probe = torch.randn(s.tokens, s.heads, s.k, device=device, dtype=dtype)

            def fwd_bwd(fn):
                return lambda: torch.autograd.backward(fn(qg, k1g, k2g, s.k)[0], probe)
            t = kb.time_ms(fwd_bwd(reference.pkm_topk), device, reps)
            base = kb.percentiles(t)["p50"]
            rows.append(kb.record("scoring_fwd_bwd_torch", t, 2 * sb, peak, 3 * fl, **shape))
            if use_triton:
                t = kb.time_ms(fwd_bwd(pkm_triton.pkm_topk), device, reps)
                rows.append(kb.record("scoring_fwd_bwd_triton", t, 2 * sb, peak, 3 * fl, base, **shape))
            progress.update(1)
        fb = kb.bag_bytes(s, stats["unique_rows"], backward=False)
        flat_idx, flat_w = indices.reshape(s.tokens, -1), weights.reshape(s.tokens, -1)
        with torch.no_grad():
            # F.embedding_bag in the table's own dtype (the reference path upcasts bf16 tables
            # to fp32 first, which would make the baseline pay for a whole-table copy).
            t = kb.time_ms(lambda: F.embedding_bag(flat_idx, values, per_sample_weights=flat_w, mode="sum"),
                           device, reps)
            base = kb.percentiles(t)["p50"]
            rows.append(kb.record("bag_fwd_torch_embedding_bag", t, fb, peak, **shape, **stats))
            t = kb.time_ms(lambda: reference.embedding_bag_gather(values, indices, weights), device, reps)
            rows.append(kb.record("bag_fwd_torch_gather_sum", t, fb, peak, None, base, **shape, **stats))
            if use_triton:
                t = kb.time_ms(lambda: bag_triton.bag_forward(values, indices, weights), device, reps)
                rows.append(kb.record("bag_fwd_triton", t, fb, peak, None, base, **shape, **stats))
        bb = kb.bag_bytes(s, stats["unique_rows"], backward=True)
        grad_out = torch.randn(s.tokens, v_dim, device=device, dtype=dtype)
        vg, wg = values.detach().requires_grad_(), flat_w.detach().requires_grad_()
        out = F.embedding_bag(flat_idx, vg, per_sample_weights=wg, mode="sum")
        note = None
        try:
            torch.autograd.grad(out, [vg, wg], grad_out, retain_graph=True)
            inputs = [vg, wg]
        except (NotImplementedError, RuntimeError) as err:  # CUDA has no bf16 per-sample-weight backward
            note = f"value gradient only: the per-sample-weight gradient failed ({str(err).splitlines()[0]})"
            inputs = [vg]
        t = kb.time_ms(lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True), device, reps)
        base = kb.percentiles(t)["p50"]
        rows.append(kb.record("bag_bwd_torch_embedding_bag", t, bb, peak, **shape, **stats, note=note))
        wg3 = weights.detach().requires_grad_()
        out_g = reference.embedding_bag_gather(vg, indices, wg3)
        t = kb.time_ms(lambda: torch.autograd.grad(out_g, [vg, wg3], grad_out, retain_graph=True), device, reps)
        rows.append(kb.record("bag_bwd_torch_gather_sum", t, bb, peak, None, base, **shape, **stats))
        out_g = None
        if use_triton:
            for variant in ("sorted", "atomic", "sparse"):
                o = bag_triton.embedding_bag(vg, indices, wg3, value_grad=variant)
                t = kb.time_ms(lambda: torch.autograd.grad(o, [vg, wg3], grad_out, retain_graph=True), device, reps)
                rows.append(kb.record(f"bag_bwd_triton_{variant}", t, bb, peak, None, base, **shape, **stats))
            # Where the sorted backward's time goes: the sort alone, and the unfused weight gradient.
            t = kb.time_ms(lambda: bag_triton._segments(indices, s.n_keys**2, every_row=True), device, reps)
            rows.append(kb.record("bag_bwd_part_sort_segments", t, None, peak, **shape))
            t = kb.time_ms(lambda: bag_triton.bag_weight_grad(grad_out, values, indices, weights.dtype), device, reps)
            rows.append(kb.record("bag_bwd_part_weight_grad_unfused", t, None, peak, **shape))
        values = vg = out = None  # free the table (up to 4 GB) before the next shape
        progress.update(1)
    return rows




def bench_scoring_configs(args, device) -> list[dict]:
    """Fused scoring forward at the first shape under each launch the autotuner considers."""
    from kernels import pkm_triton

    s = kb.Shape(args.tokens, args.heads, args.k, args.n_keys, args.k_dim, 1, DTYPES[args.dtype])
    q, k1, k2, _ = kb.make_inputs(s, device)
    with torch.no_grad():  # fp32 on the same bf16 values: the kernel's own arithmetic, up to summation order
        want = reference.pkm_topk(q.float(), k1.float(), k2.float(), s.k)[1].sort(-1).values
    rows = []
    for block_t, block_n, warps in tqdm(pkm_triton.LAUNCHES, desc="scoring configs"):
        fn = lambda: pkm_triton.pkm_topk_forward(q, k1, k2, s.k, launch=(block_t, block_n, warps))  # noqa: E731
        agree = (fn()[1].sort(-1).values == want).all(-1).float().mean().item()
        t = kb.time_ms(fn, device, args.repeats)
        row = {"block_t": block_t, "block_n": block_n, "num_warps": warps, "index_agreement": agree, **kb.percentiles(t)}
        tqdm.write(f"BLOCK_T {block_t:3d} BLOCK_N {block_n:4d} warps {warps}: p50 {row['p50']:.3f} ms "
                   f"(p20 {row['p20']:.3f}, p80 {row['p80']:.3f}); slot sets equal to fp32 PyTorch's: {100 * agree:.2f}%")
        rows.append(row)
    return rows


def autotuned_configs() -> dict:
    """The launch configuration each autotuned kernel chose, per tuning key (for the JSON)."""
    from kernels import bag_triton, pkm_triton

    tuners = {"pkm_fwd": pkm_triton._pkm_fwd, "bag_fwd": bag_triton._bag_fwd,
              "bag_weight_grad": bag_triton._bag_weight_grad, "bag_bwd_sorted": bag_triton._bag_bwd_sorted}
    return {name: {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
            for name, tuner in tuners.items()}


UNSTEADY = 1.15  # p80 / p20 above this flags a row whose median should not be quoted alone


def format_row(r: dict) -> str:
    def f(key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "-"
    line = (f"{r['name']:32s} {r['v_dim']:>6d} {f('p20', '9.3f')} {f('p50', '9.3f')} {f('p80', '9.3f')} "
            f"{f('gb_s', '8.1f')} {f('pct_peak', '6.1f')} {f('tflop_s', '8.2f')} {f('speedup', '8.2f')}")
    notes = [r["note"]] if r.get("note") else []
    if r["p80"] > UNSTEADY * r["p20"]:
        notes.append(f"unsteady: p80 is {r['p80'] / r['p20']:.2f}x p20 (bimodal or disturbed); rerun before quoting p50")
    return line + "".join(f"\n    note: {n}" for n in notes)


TABLE_HEADER = (f"{'kernel':32s} {'v_dim':>6s} {'p20':>9s} {'p50':>9s} {'p80':>9s} {'GB/s':>8s} {'%peak':>6s} "
                f"{'TFLOP/s':>8s} {'speedup':>8s}   (ms; speedup vs the PyTorch row above it)")


class StreamedRows(list):
    """Result rows, each printed as it is measured, so a failure later keeps what came before."""

    def append(self, row: dict) -> None:
        if not self:
            tqdm.write(TABLE_HEADER)
        tqdm.write(format_row(row))
        super().append(row)


def write_json(path: Path, payload: dict) -> None:
    atomic_write(path, json.dumps(payload, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = kb.device_info(device)
    payload = {**info, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()}}
    if device.type != "cuda":
        print("no CUDA device: timing the PyTorch paths only; Triton timing skipped")
        payload["triton_skipped"] = True
    if args.scoring_configs:
        if device.type != "cuda":
            print("--scoring-configs needs a CUDA device")
            return 2
        payload["scoring_configs"] = bench_scoring_configs(args, device)
    elif args.sweep:
        n_list = [64, 128, 256, 512, 1024]
        with tqdm(total=len(n_list), desc="sweep") as bar:
            rows = kb.sweep_scoring(args.sweep_tokens, args.heads, args.k, args.k_dim, n_list, device,
                                    args.repeats, bar)
        payload["sweep"] = rows
        print(f"{'n_keys':>7s} {'slots':>9s} {'product-key us/tok':>19s} {'brute-force us/tok':>19s} {'ratio':>7s}")
        for r in rows:
            print(f"{r['n_keys']:7d} {r['slots']:9d} {r['product_key_us_per_token']:19.2f} "
                  f"{r['brute_force_us_per_token']:19.2f} {r['brute_over_product']:7.1f}")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        slots = [r["slots"] for r in rows]
        ax.loglog(slots, [r["product_key_us_per_token"] for r in rows], "o-", label="product keys")
        ax.loglog(slots, [r["brute_force_us_per_token"] for r in rows], "s-", label="brute force")
        ax.set_xlabel("slots N"), ax.set_ylabel("us per token"), ax.legend(), ax.set_title(info["device"])
        fig.tight_layout()
        atomic_write(args.plot, fig.savefig)
        print(f"plot written to {args.plot}")
    else:
        with tqdm(total=2 * len(args.v_dims), desc="kernels") as bar:
            rows = bench_shapes(args, device, info, bar)
        payload["results"] = rows
        if device.type == "cuda":
            payload["autotuned"] = autotuned_configs()
            for name, chosen in payload["autotuned"].items():
                for key, config in chosen.items():
                    print(f"autotuned {name} {key}: {config}")
        print(f"device: {info['device']} (SKU {info['sku']}, peak {info['peak_tbs']} TB/s)")
    if args.json:
        write_json(args.json, payload)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
