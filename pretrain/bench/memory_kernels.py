"""The kernel rows of tools/bench_kernels.py: product-key scoring and the weighted bag, forward
and backward, each PyTorch baseline and (on CUDA) each Triton variant at the given shapes; every
launch candidate of the autotuned kernels (--configs); the launch each autotuned kernel chose.
Timing and the bytes model are kernels/benchmark.py's; printing and the JSON are the tool's."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from tqdm import tqdm

from kernels import VALUE_GRADS, reference
from kernels import benchmark as kb

DTYPES = kb.DTYPES


@contextlib.contextmanager
def module_constant(module, name: str, value):
    """Set a module-level tuning constant (read at call time) for the rows timed inside."""
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def steady_timer(device, repeats: int, reruns: int):
    """time(fn) -> (per-call times of the steadiest attempt, every attempt's percentiles)."""
    return lambda fn: kb.time_steady(lambda: kb.time_ms(fn, device, repeats), reruns)


def bench_shapes(args, device, info, progress, rows: list) -> list[dict]:
    """The scoring rows (once: scoring does not read the values), then per value dim the bag's
    forward and backward rows; PyTorch baselines always, Triton on CUDA. `progress` advances once
    for the scoring and once per value dim (`shape_steps`); `rows` receives each row as it is
    measured (a StreamedRows that saves, say)."""
    use_triton = device.type == "cuda"
    peak = info["peak_tbs"]
    timed = steady_timer(device, args.repeats, args.reruns)
    dtype = DTYPES[args.dtype]

    def add(name, fn, nbytes=None, flops=None, baseline=None, **extra) -> float:
        """Time fn, append its row, return its p50 (the baseline of the rows after it)."""
        t, attempts = timed(fn)
        rows.append(kb.record(name, t, nbytes, peak, flops, baseline, attempts=attempts, **extra))
        return rows[-1]["p50"]

    for v_dim in args.v_dims:
        s = kb.Shape(args.tokens, args.heads, args.k, args.n_keys, args.k_dim, v_dim, dtype)
        q, k1, k2, values = kb.make_inputs(s, device)
        shape = {
            "tokens": s.tokens,
            "heads": s.heads,
            "k": s.k,
            "n_keys": s.n_keys,
            "k_dim": s.k_dim,
            "v_dim": v_dim,
            "dtype": args.dtype,
        }
        with torch.no_grad():
            weights, indices = reference.pkm_topk(q, k1, k2, s.k)
        if args.index_skew > 0:
            indices = kb.zipf_indices(indices.shape, s.n_keys**2, args.index_skew, device)
            shape["index_skew"] = args.index_skew
        stats = kb.row_stats(indices)
        if v_dim == args.v_dims[0]:  # scoring does not depend on the value dim
            _scoring_rows(add, args, s, (q, k1, k2), indices, shape, use_triton)
            progress.update(1)
        _bag_forward_rows(add, s, values, indices, weights, shape, stats, use_triton)
        _bag_backward_rows(add, args, s, values, indices, weights, shape, stats, use_triton)
        values = None  # free the table (up to 4 GB) before the next shape
        progress.update(1)
    return rows


def shape_steps(args) -> int:
    """The progress steps of `bench_shapes`: the scoring, then each value dim's bag rows."""
    return 1 + len(args.v_dims)


def _scoring_rows(add, args, s, qkk, indices, shape: dict, use_triton: bool) -> None:
    """Product-key scoring: forward, forward+backward, and on Triton the backward alone on the
    forward's saved weights and indices (also at each --key-chunks KEY_CHUNK)."""
    q, k1, k2 = qkk
    sb, fl = kb.scoring_bytes(s), kb.scoring_flops(s)
    sb_bwd = kb.scoring_bytes(s, backward=True)
    if use_triton:
        from kernels import pkm_bwd_triton, pkm_triton
    with torch.no_grad():
        base = add("scoring_fwd_torch", lambda: kb.scoring_baseline(q, k1, k2, s.k), sb, fl, **shape)
        if use_triton:
            add("scoring_fwd_triton", lambda: pkm_triton.pkm_topk(q, k1, k2, s.k), sb, fl, base, **shape)
    qg, k1g, k2g = (x.detach().requires_grad_() for x in (q, k1, k2))
    probe = torch.randn(s.tokens, s.heads, s.k, device=q.device, dtype=s.dtype)

    def fwd_bwd(fn):
        return lambda: torch.autograd.grad(fn(qg, k1g, k2g, s.k)[0], [qg, k1g, k2g], probe)

    base = add("scoring_fwd_bwd_torch", fwd_bwd(kb.scoring_baseline), sb + sb_bwd, 3 * fl, **shape)
    if not use_triton:
        return
    add("scoring_fwd_bwd_triton", fwd_bwd(pkm_triton.pkm_topk), sb + sb_bwd, 3 * fl, base, **shape)
    # The backward alone, on the forward's saved fp32 weights and indices: the
    # earlier PyTorch scatter + matmuls against the Triton backward. With
    # --index-skew the slots are the Zipf ones (hot half-keys: the chunked path).
    with torch.no_grad():
        w32, idx = pkm_triton.pkm_topk_forward(q, k1, k2, s.k)
    saved = (probe, q, k1, k2, w32, indices if args.index_skew > 0 else idx)
    base = add(
        "scoring_bwd_torch_on_saved",
        lambda: pkm_triton.pkm_topk_backward_torch(*saved),
        sb_bwd,
        2 * fl,
        **shape,
    )
    add("scoring_bwd_triton", lambda: pkm_triton.pkm_topk_backward(*saved), sb_bwd, 2 * fl, base, **shape)
    for chunk in args.key_chunks:
        with module_constant(pkm_bwd_triton, "KEY_CHUNK", chunk):
            add(
                f"scoring_bwd_triton_key_chunk{chunk}",
                lambda: pkm_triton.pkm_topk_backward(*saved),
                sb_bwd,
                2 * fl,
                base,
                key_chunk=chunk,
                **shape,
            )


def _bag_forward_rows(add, s, values, indices, weights, shape: dict, stats: dict, use_triton: bool) -> None:
    """The weighted bag's forward: F.embedding_bag, the reference gather + sum, and on CUDA Triton's."""
    fb = kb.bag_bytes(s, stats["unique_rows"], backward=False)
    flat_idx, flat_w = indices.reshape(s.tokens, -1), weights.reshape(s.tokens, -1)
    with torch.no_grad():
        # F.embedding_bag in the table's own dtype (the reference path upcasts bf16 tables
        # to fp32 first, which would make the baseline pay for a whole-table copy).
        base = add(
            "bag_fwd_torch_embedding_bag",
            lambda: F.embedding_bag(flat_idx, values, per_sample_weights=flat_w, mode="sum"),
            fb,
            **shape,
            **stats,
        )
        add(
            "bag_fwd_torch_gather_sum",
            lambda: reference.embedding_bag_gather(values, indices, weights),
            fb,
            None,
            base,
            **shape,
            **stats,
        )
        if use_triton:
            from kernels import bag_triton

            add(
                "bag_fwd_triton",
                # as the memory layers read it: no host read of the indices' range
                lambda: bag_triton.bag_forward(values, indices, weights, check_indices=False),
                fb,
                None,
                base,
                **shape,
                **stats,
            )


def _bag_backward_rows(add, args, s, values, indices, weights, shape: dict, stats: dict, use_triton: bool) -> None:
    """The weighted bag's backward: F.embedding_bag's, the reference gather + sum's, and on CUDA
    each Triton value-gradient variant (the sorted one also at each --row-chunks ROW_CHUNK) and
    the sorted backward's parts (the sort, the unfused weight gradient)."""
    bb = kb.bag_bytes(s, stats["unique_rows"], backward=True)
    flat_idx, flat_w = indices.reshape(s.tokens, -1), weights.reshape(s.tokens, -1)
    grad_out = torch.randn(s.tokens, s.v_dim, device=values.device, dtype=s.dtype)
    vg, wg = values.detach().requires_grad_(), flat_w.detach().requires_grad_()
    out = F.embedding_bag(flat_idx, vg, per_sample_weights=wg, mode="sum")
    note = None
    try:
        torch.autograd.grad(out, [vg, wg], grad_out, retain_graph=True)
        inputs = [vg, wg]
    except (NotImplementedError, RuntimeError) as err:  # CUDA has no bf16 per-sample-weight backward
        note = f"value gradient only: the per-sample-weight gradient failed ({str(err).splitlines()[0]})"
        inputs = [vg]
    base = add(
        "bag_bwd_torch_embedding_bag",
        lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True),
        bb,
        **shape,
        **stats,
        note=note,
    )
    wg3 = weights.detach().requires_grad_()
    out_g = reference.embedding_bag_gather(vg, indices, wg3)
    add(
        "bag_bwd_torch_gather_sum",
        lambda: torch.autograd.grad(out_g, [vg, wg3], grad_out, retain_graph=True),
        bb,
        None,
        base,
        **shape,
        **stats,
    )
    out_g = None
    if not use_triton:
        return
    from kernels import bag_triton

    for variant in VALUE_GRADS:
        o = bag_triton.embedding_bag(vg, indices, wg3, value_grad=variant)
        add(
            f"bag_bwd_triton_{variant}",
            lambda: torch.autograd.grad(o, [vg, wg3], grad_out, retain_graph=True),
            bb,
            None,
            base,
            **shape,
            **stats,
        )
    for chunk in args.row_chunks:
        with module_constant(bag_triton, "ROW_CHUNK", chunk):
            o = bag_triton.embedding_bag(vg, indices, wg3, value_grad="sorted")
            add(
                f"bag_bwd_triton_sorted_row_chunk{chunk}",
                lambda: torch.autograd.grad(o, [vg, wg3], grad_out, retain_graph=True),
                bb,
                None,
                base,
                row_chunk=chunk,
                **shape,
                **stats,
            )
    # Where the sorted backward's time goes: the sort alone, and the unfused weight gradient.
    add(
        "bag_bwd_part_sort_segments",
        lambda: bag_triton._segments(indices, s.n_keys**2, every_row=True),
        **shape,
    )
    add(
        "bag_bwd_part_weight_grad_unfused",
        lambda: bag_triton.bag_weight_grad(grad_out, values, indices, weights.dtype),
        **shape,
    )


def bench_launch_configs(args, device, save_partial=None) -> dict:
    """Every launch candidate of each autotuned kernel at the first shape (bag kernels at
    each value dim), with p20/p50/p80; the winner per kernel and tuning key is the fastest
    p50 among steady candidates (p80/p20 <= 1.15), or the lowest p80 when none is steady.
    `save_partial(**sections)` receives the result so far after each kernel.
    Each candidate's output is compared with the first candidate's (index agreement for
    the scoring forward, relative difference otherwise), so a launch that computes wrongly
    is seen, not pinned."""
    from kernels import bag_triton, pkm_bwd_triton, pkm_triton
    from kernels import launch_configs as lc

    dtype = DTYPES[args.dtype]
    s = kb.Shape(args.tokens, args.heads, args.k, args.n_keys, args.k_dim, 1, dtype)
    q, k1, k2, _ = kb.make_inputs(s, device)
    with torch.no_grad():
        w32, idx = pkm_triton.pkm_topk_forward(q, k1, k2, s.k)
    g = torch.randn(s.tokens, s.heads, s.k, device=device, dtype=dtype)
    cases = [
        ("pkm_fwd", None, lambda: pkm_triton.pkm_topk_forward(q, k1, k2, s.k)[1].sort(-1).values),
        ("pkm_bwd_rows", None, lambda: pkm_bwd_triton.score_backward(g, q, k1, k2, w32, idx)[0]),
        ("pkm_bwd_keys", None, lambda: pkm_bwd_triton.score_backward(g, q, k1, k2, w32, idx)[1]),
    ]
    weights = w32.to(dtype)
    tables = {}
    for v_dim in args.v_dims:
        values = kb.make_inputs(kb.Shape(1, 1, 1, s.n_keys, 2, v_dim, dtype), device)[3]
        grad_out = torch.randn(s.tokens, v_dim, device=device, dtype=dtype)
        tables[v_dim] = (values, grad_out)
        cases += [
            ("bag_fwd", v_dim, lambda v=v_dim: bag_triton.bag_forward(tables[v][0], idx, weights, False)),
            (
                "bag_bwd_sorted",
                v_dim,
                lambda v=v_dim: bag_triton.bag_backward_sorted(
                    tables[v][1], idx, weights, s.n_keys**2, dtype, tables[v][0]
                )[0],
            ),
        ]
    sku = kb.device_info(device)["sku"]
    rows, pins = [], {}
    for kernel, v_dim, fn in tqdm(cases, desc="launch configs"):
        lc.LAST_KEY.pop(kernel, None)
        lc.TUNERS[kernel].cache.clear()  # so the pruning hook runs again and records the tuning key
        with torch.no_grad():
            first = None
            fn()  # the autotuned (or pinned) launch
            key = lc.LAST_KEY.get(kernel)
            timed = []
            for config in lc.TUNERS[kernel].configs:
                row = {"kernel": kernel, "v_dim": v_dim, "key": str(key), "config": lc.launch_spec(config)}
                try:
                    with lc.forced(kernel, config):
                        out = fn()
                        row.update(kb.percentiles(kb.time_ms(fn, device, args.repeats)))
                except Exception as err:  # a launch this GPU cannot run (registers, shared memory)
                    row["error"] = str(err).splitlines()[0][:200]
                    tqdm.write(f"{kernel} {row['config']}: failed: {row['error']}")
                    rows.append(row)
                    continue
                if first is None:
                    first = out
                if kernel == "pkm_fwd":
                    row["agreement_with_first"] = (out == first).all(-1).float().mean().item()
                else:  # on the first 2**24 elements: a 1M x 2048 gradient would need 16 GB in fp32
                    a, b = out.reshape(-1)[: 2**24].float(), first.reshape(-1)[: 2**24].float()
                    row["rel_diff_to_first"] = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                row["spread"] = row["p80"] / row["p20"]
                tqdm.write(
                    f"{kernel:15s} d={v_dim or '-'} {row['config']}: p50 {row['p50']:.3f} ms "
                    f"(p20 {row['p20']:.3f}, p80 {row['p80']:.3f})"
                )
                rows.append(row)
                timed.append((row, config))
        steady = [rc for rc in timed if rc[0]["spread"] <= kb.UNSTEADY]
        if timed and key is not None:
            best_row, best = (
                min(steady, key=lambda rc: rc[0]["p50"]) if steady else min(timed, key=lambda rc: rc[0]["p80"])
            )
            best_row["winner"] = True
            pins.setdefault(kernel, {})[str(key)] = lc.launch_spec(best)
            tqdm.write(f"winner: {lc.table_entry(sku, kernel, key, best)}")
        if save_partial is not None:
            save_partial(sku=sku, launch_configs=rows, pins=pins)
    return {"sku": sku, "launch_configs": rows, "pins": pins}


def autotuned_configs() -> dict:
    """The launch configuration each autotuned kernel chose, per tuning key (for the JSON)."""
    from kernels import bag_triton, pkm_triton  # noqa: F401  (importing registers the tuners)
    from kernels.launch_configs import TUNERS

    return {
        name: {str(key): str(config) for key, config in getattr(tuner, "cache", {}).items()}
        for name, tuner in TUNERS.items()
    }
