"""Kernel benchmark library behind tools/bench_kernels.py: inputs, timing, bytes model.

Bytes moved (each input read once, each output written once; e = value element size,
q = query element size, M = T*H*k entries, n = n_keys, N = n*n, U = unique rows):
  scoring fwd   T*H*k_dim*q + 2*H*n*(k_dim/2)*q + M*(q + 8)            FLOPs 2*T*H*n*k_dim
  scoring bwd   the forward's bytes + grads of query and keys (same sizes) FLOPs 2x forward
  bag fwd       M*d*e (gathered rows) + M*(8 + e) + T*d*e (output)
  bag bwd       M*d*e (grad_out rows, one per entry) + U*d*e (value rows, for dweights)
                + U*d*e (touched dvalue rows written) + M*(8 + 2e)
A gathered row counts once per entry that reads it: the table is far larger than L2 and
rows repeat only a few times, so that is what leaves HBM (duplicates may hit in L2, so
a kernel can exceed the counted bandwidth slightly; unique rows and the largest
multiplicity are reported beside each bag shape). Some M*d term is unavoidable in the
backward: either grad_out rows are gathered per entry or dvalue partials are scattered
per entry. Value rows count once per unique row, what the fused sorted backward reads;
the unfused variants (atomic) read them once per entry, M*d*e more than counted. The
dense form's zero fill of untouched rows (N - U)*d*e is not counted.

The PyTorch scoring baseline is `reference.pkm_topk` with `score_dtype` = the inputs' dtype
(`scoring_baseline`): at --dtype bf16 its half-key scores are bf16 tensor-core matmuls, the
fastest PyTorch formulation and the one the earlier records (H100, H200) timed. The reference
path itself scores in fp32 (exact enough to select the slots the Triton kernel selects), which
adds casts and fp32 matmuls: against it the Triton ratio would be larger, so the baseline keeps
the ratio conservative.
"""

from __future__ import annotations

import datetime
import functools
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kernels import reference
from kernels.devices import PEAK_BANDWIDTH_TBS, sku_for


@dataclass
class Shape:
    tokens: int
    heads: int
    k: int
    n_keys: int
    k_dim: int
    v_dim: int
    dtype: torch.dtype


def scoring_baseline(query, keys1, keys2, k: int):
    """The PyTorch scoring the benchmarks time against: `reference.pkm_topk` scoring in the
    inputs' dtype (see the module docstring)."""
    return reference.pkm_topk(query, keys1, keys2, k, score_dtype=query.dtype)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}  # the --dtype choices of the benchmarks


def make_inputs(s: Shape, device, seed: int = 0):
    """Random query, half-keys and value table, drawn on `device` (a 1M x 2048 table is
    2G numbers: drawing it on the CPU would take longer than the whole benchmark)."""
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(s.dtype)

    q = randn(s.tokens, s.heads, s.k_dim)
    k1 = randn(s.heads, s.n_keys, s.k_dim // 2, scale=s.k_dim**-0.5)
    k2 = randn(s.heads, s.n_keys, s.k_dim // 2, scale=s.k_dim**-0.5)
    values = randn(s.n_keys**2, s.v_dim, scale=s.v_dim**-0.5)
    return q, k1, k2, values


def zipf_indices(shape, num_slots: int, exponent: float, device, seed: int = 1) -> torch.Tensor:
    """Slot ids drawn with P(rank r) ~ r**-exponent over all slots, ranks scattered over
    the table by a random permutation: a few hot slots, as a trained memory has."""
    g = torch.Generator(device=device).manual_seed(seed)
    probs = torch.arange(1, num_slots + 1, device=device, dtype=torch.float64).pow(-exponent)
    ranks = torch.multinomial(probs.float(), int(torch.Size(shape).numel()), replacement=True, generator=g)
    slot_of_rank = torch.randperm(num_slots, device=device, generator=g)
    return slot_of_rank[ranks].reshape(shape)


def time_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    """Per-call milliseconds: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_once_ms(fn, device: torch.device):
    """(fn's result, the wall-clock milliseconds of one call): the device is idle when the clock
    starts (work queued before, such as the inputs' copies, is not counted in) and `fn`'s own
    queued kernels have finished when it stops. Wall time, for work whose host side counts too."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, (time.perf_counter() - start) * 1e3


UNSTEADY = 1.15  # p80 / p20 above this: bimodal or disturbed, the median should not be quoted alone


def spread(times: list[float]) -> float:
    """p80 / p20 of the per-call times."""
    p = percentiles(times)
    return p["p80"] / p["p20"]


def time_steady(measure, reruns: int = 2, max_spread: float = UNSTEADY):
    """Call `measure()` (-> per-call times) until its p80/p20 is at most `max_spread`,
    at most 1 + `reruns` times; return the steadiest attempt's times and every attempt's
    percentiles (so a rerun row shows what it replaced)."""
    attempts = []
    for _ in range(1 + reruns):
        times = measure()
        attempts.append((spread(times), times))
        if attempts[-1][0] <= max_spread:
            break
    best = min(attempts, key=lambda a: a[0])[1]
    return best, [percentiles(t) for _, t in attempts]


def percentiles(times: list[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    return {f"p{p}": torch.quantile(t, p / 100).item() for p in (20, 50, 80)}


def scoring_bytes(s: Shape, backward: bool = False) -> int:
    """The module docstring's bytes model: the forward's, or (`backward`) the backward's, which
    reads what the forward did and writes the query's and both key sets' gradients."""
    q = torch.finfo(s.dtype).bits // 8
    M = s.tokens * s.heads * s.k
    query, keys = s.tokens * s.heads * s.k_dim * q, s.heads * s.n_keys * s.k_dim * q
    forward = query + keys + M * (q + 8)
    return forward + query + keys if backward else forward


def scoring_flops(s: Shape) -> float:
    return 2.0 * s.tokens * s.heads * s.n_keys * s.k_dim


def bag_bytes(s: Shape, unique_rows: int, backward: bool) -> int:
    e = torch.finfo(s.dtype).bits // 8
    M = s.tokens * s.heads * s.k
    if backward:
        return M * s.v_dim * e + 2 * unique_rows * s.v_dim * e + M * (8 + 2 * e)
    return M * s.v_dim * e + M * (8 + e) + s.tokens * s.v_dim * e


def row_stats(indices: torch.Tensor) -> dict:
    _, counts = torch.unique(indices.reshape(-1), return_counts=True)
    return {"unique_rows": int(counts.numel()), "max_row_multiplicity": int(counts.max())}


def device_info(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"device": "cpu", "sku": None, "peak_tbs": None}
    name = torch.cuda.get_device_name(device)
    sku = sku_for(name)
    return {"device": name, "sku": sku, "peak_tbs": PEAK_BANDWIDTH_TBS.get(sku)}


def record(
    name: str,
    times: list[float],
    nbytes: int | None,
    peak_tbs: float | None,
    flops: float | None = None,
    baseline_ms: float | None = None,
    **extra,
) -> dict:
    row = {"name": name, **percentiles(times), **extra, "times_ms": [float(t) for t in times]}
    p50_s = row["p50"] / 1e3
    if nbytes is not None:
        row["bytes"] = nbytes
        row["gb_s"] = nbytes / p50_s / 1e9
        row["pct_peak"] = 100 * row["gb_s"] / (peak_tbs * 1e3) if peak_tbs else None
    if flops is not None:
        row["tflop_s"] = flops / p50_s / 1e12
    if baseline_ms is not None:
        row["speedup"] = baseline_ms / row["p50"]
    if len(row.get("attempts") or ()) <= 1:
        row.pop("attempts", None)
    return row


REPO_ROOT = Path(__file__).resolve().parents[1]


def source_commit() -> str:
    """The commit the code being timed comes from: $MEMLAYERS_COMMIT when set (tools/gpu_check.sh
    sets it from COMMIT, as the device copy's .git may be stale), else `git rev-parse HEAD` of this
    checkout with "-dirty" when tracked files differ from it, else "unknown"."""
    named = os.environ.get("MEMLAYERS_COMMIT", "").strip()
    return named or _checkout_commit()


@functools.lru_cache(maxsize=1)
def _checkout_commit() -> str:
    """This checkout's commit, asked of git once per process (a JSON rewritten after every row
    would otherwise run `git status` each time)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def run_info(device: torch.device) -> dict:
    """What a benchmark JSON records beside its rows: the device (name, SKU, peak bandwidth),
    the UTC date and time, the commit and the torch version."""
    return {
        **device_info(torch.device(device)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": source_commit(),
        "torch": torch.__version__,
    }


def write_results(path: str | Path, device, settings: dict, **sections) -> dict:
    """Write a benchmark's JSON to `path` atomically and return it: `run_info(device)` (device, date,
    commit, torch version), the command's options as text under "settings", then `sections` (the
    raw per-step or per-call times beside the numbers summarised from them)."""
    import json

    from pretrain.files import atomic_write

    payload = {**run_info(torch.device(device)), "settings": {k: str(v) for k, v in settings.items()}, **sections}
    atomic_write(path, json.dumps(payload, indent=2) + "\n")
    return payload


def sweep_scoring(tokens: int, heads: int, k: int, k_dim: int, n_keys_list, device, repeats: int, progress=None):
    """Time per token of product-key vs brute-force scoring as N = n_keys**2 grows."""
    rows = []
    for n in n_keys_list:
        s = Shape(tokens, heads, k, n, k_dim, 1, torch.float32)
        q, k1, k2, _ = make_inputs(s, device)
        with torch.no_grad():
            pk_times = time_ms(lambda: reference.pkm_scores_topk(q, k1, k2, s.k), device, repeats)
            bf_times = time_ms(lambda: reference.brute_force_topk(q, k1, k2, s.k), device, repeats)
        pk, bf = percentiles(pk_times)["p50"], percentiles(bf_times)["p50"]
        rows.append(
            {
                "n_keys": n,
                "slots": n * n,
                "product_key_us_per_token": 1e3 * pk / tokens,
                "brute_force_us_per_token": 1e3 * bf / tokens,
                "brute_over_product": bf / pk,
                "tokens": tokens,
                "product_key_times_ms": pk_times,
                "brute_force_times_ms": bf_times,
            }
        )
        if progress is not None:
            progress.update(1)
    return rows
