"""CPU-path formulations of the memory layer side by side: CPU time per call, one process.

The PyTorch path (the CPU path, kernels/reference.py and kernels/ops.py) has places where two
formulations compute the same numbers at different costs; this times both, alternating them call
by call so that a shared machine's load hits both alike, and prints each one's median CPU time
(time.thread_time: the waiting of a loaded machine left out) and their ratio.

  scoring_backward  the scoring's backward (memlayers::pkm_topk_backward, torch backend): the
                    dense score-gradient matmuls against the per-row embedding-bag sums
                    (kernels.ops.use_dense_half_key_grads picks one by shape)
  row_topk          the compiled half-key top-k (kernels/csrc/row_topk.cpp) on 1 thread and on
                    --threads (default 2, the demo's cores): wall time, the rows split over threads
  rotary            RoPE forward+backward (pretrain.model.transformer.apply_rotary, one complex
                    product) against the same rotation written out (selects, four products, stack)

  python tools/bench_cpu_paths.py                       # the demo's shape and two larger pools
  python tools/bench_cpu_paths.py --shapes 2048:4:128:16:64 --rounds 21 --json cpu_paths.json

Shapes are T:H:n_keys:k:k_dim (T tokens: the demo's micro-batch is 16 x 128 = 2048); the rotary
runs at the demo's (16, 128, 4 heads, head_dim 32), --rotary-shape B:S:H:head_dim. Pure timing,
one thread (OMP_NUM_THREADS does not matter) but row_topk's second column: nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from kernels import cpu_ops, ops, reference  # noqa: E402
from kernels.benchmark import write_results  # noqa: E402
from pretrain.cli import output_file, positive_int  # noqa: E402
from pretrain.model.transformer import apply_rotary, rotary_frequencies  # noqa: E402

DEFAULT_SHAPES = ("2048:4:128:16:64", "2048:4:512:32:128", "2048:4:1024:32:256")


def shape(text: str) -> tuple[int, ...]:
    parts = text.split(":")
    if len(parts) != 5 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected T:H:n_keys:k:k_dim, positive integers (e.g. 2048:4:128:16:64)"
        )
    T, H, n, k, k_dim = map(int, parts)
    if k > n or k_dim % 2:
        raise argparse.ArgumentTypeError(f"{text!r}: k must be at most n_keys and k_dim even (e.g. 2048:4:128:16:64)")
    return T, H, n, k, k_dim


def cpu_times(calls: dict, rounds: int, clock=time.thread_time) -> dict[str, list[float]]:
    """CPU seconds (or `clock`'s) of each call per round, the calls alternated within each round
    (one warm-up)."""
    for fn in calls.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            start = clock()
            fn()
            times[name].append(clock() - start)
    return times


def scoring_backward_calls(T: int, H: int, n: int, k: int, k_dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k1, k2 = (torch.randn(*s, generator=g) for s in ((T, H, k_dim), (H, n, k_dim // 2), (H, n, k_dim // 2)))
    w, idx = reference.pkm_topk_fp32(q, k1, k2, k)
    grad = torch.randn(w.shape, generator=g)

    def formulation(max_keys_per_k: int):
        def call():
            saved = ops.DENSE_KEY_GRAD_MAX_KEYS_PER_K
            ops.DENSE_KEY_GRAD_MAX_KEYS_PER_K = max_keys_per_k
            try:
                ops._pkm_topk_backward_gathered(grad, q, k1, k2, w, idx)
            finally:
                ops.DENSE_KEY_GRAD_MAX_KEYS_PER_K = saved

        return call

    return {"sparse": formulation(0), "dense": formulation(n)}


def rotary_written_out(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """apply_rotary's rotation as it was written before (the baseline)."""
    xr = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]
    out = torch.stack([xr[..., 0] * cos - xr[..., 1] * sin, xr[..., 0] * sin + xr[..., 1] * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


def rotary_calls(B: int, S: int, H: int, head_dim: int) -> dict:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, H, head_dim, generator=g, requires_grad=True)
    grad, freqs = torch.randn(x.shape, generator=g), rotary_frequencies(head_dim, S, 10000.0)

    def forward_backward(rotate):
        return lambda: torch.autograd.grad(rotate(x, freqs), x, grad)

    return {"written_out": forward_backward(rotary_written_out), "complex": forward_backward(apply_rotary)}


def row_topk_calls(T: int, H: int, n: int, k: int, threads: int) -> dict:
    scores = torch.randn(H, T, n, generator=torch.Generator().manual_seed(0))

    def on(count: int):
        def call():
            torch.set_num_threads(count)
            try:
                cpu_ops.row_topk_indices(scores, k)
            finally:
                torch.set_num_threads(1)

        return call

    return {"1_thread": on(1), f"{threads}_threads": on(threads)}


def rotary_shape(text: str) -> tuple[int, ...]:
    parts = text.split(":")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts) or int(parts[3]) % 2:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected B:S:H:head_dim, positive, head_dim even (e.g. 16:128:4:32)"
        )
    return tuple(map(int, parts))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--shapes",
        type=shape,
        nargs="+",
        default=[shape(s) for s in DEFAULT_SHAPES],
        help="scoring shapes to time, each T:H:n_keys:k:k_dim",
    )
    p.add_argument(
        "--rotary-shape",
        type=rotary_shape,
        default=rotary_shape("16:128:4:32"),
        help="rotary embedding shape to time, B:S:H:head_dim",
    )
    p.add_argument("--threads", type=positive_int, default=2, help="row_topk's threads beside 1")
    p.add_argument("--rounds", type=positive_int, default=11, help="timed rounds per call (the median is reported)")
    p.add_argument("--json", type=output_file("cpu_paths.json"), default=None, help="also write every call's time")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print("part              shape                    first ms   second ms   second/first   (median CPU time)")

    def report(part: str, label: str, calls: dict, clock=time.thread_time, **extra) -> None:
        times = cpu_times(calls, args.rounds, clock)
        (a, ta), (b, tb) = times.items()
        ma, mb = statistics.median(ta) * 1e3, statistics.median(tb) * 1e3
        note = "".join(f"   ({key}: {value})" for key, value in extra.items())
        print(f"{part:17s} {label:24s} {a} {ma:8.2f}  {b} {mb:8.2f}   {mb / ma:6.2f}x{note}")
        rows.append({"part": part, "shape": label, **extra, "median_ms": {a: ma, b: mb}, "times_s": times})

    for T, H, n, k, k_dim in args.shapes:
        used = "dense" if ops.use_dense_half_key_grads(n, k, torch.device("cpu")) else "sparse"
        report("scoring_backward", f"{T}:{H}:{n}:{k}:{k_dim}", scoring_backward_calls(T, H, n, k, k_dim), used=used)
    if cpu_ops.available():
        T, H, n, k, _ = args.shapes[0]
        calls = row_topk_calls(T, H, n, k, args.threads)
        report("row_topk", f"{T}:{H}:{n}:{k}", calls, clock=time.perf_counter, time="wall")
    report("rotary", ":".join(map(str, args.rotary_shape)), rotary_calls(*args.rotary_shape))
    if args.json:
        write_results(
            args.json,
            "cpu",
            {"shapes": args.shapes, "rotary_shape": args.rotary_shape, "threads": args.threads, "rounds": args.rounds},
            rows=rows,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
