"""pretrain.bench.layer on the rows a CUDA run makes (Triton and PyTorch paths): the speedups."""

from __future__ import annotations

import random

from pretrain.bench.layer import add_speedups

BOTH_PATHS = ["memory_layer_fwd_bwd", "memory_part_scoring_fwd_bwd", "memory_part_bag_fwd_bwd", "memory_part_rest"]
BOTH_PATHS += ["model_fwd_bwd"]
TRITON_ONLY = [f"kind_{k}_fwd_bwd" for k in ("attention", "ffn", "output_head", "memory")]


def cuda_rows() -> list[dict]:
    """Rows named as bench_layer names them on CUDA: every part on both paths, the sublayer kinds
    and the compiled model on the first path (Triton) only, and the unattributed rest (no p50)."""
    rng = random.Random(0)
    rows = [{"name": f"{n}_{path}", "p50": rng.uniform(1, 100)} for path in ("triton", "torch") for n in BOTH_PATHS]
    rows += [{"name": f"{n}_triton", "p50": rng.uniform(1, 100)} for n in TRITON_ONLY]
    rows.append({"name": "model_fwd_bwd_triton_compiled", "p50": 3.0})
    rows.append({"name": "kind_unattributed_triton", "total_ms": 1.0, "share": 0.1})
    return rows


def test_each_triton_row_is_compared_with_its_own_pytorch_twin():
    """Before, every memory_* Triton row was divided into the whole PyTorch layer's time and every
    other one into the whole model's (a part or a sublayer kind against the whole), and the
    unattributed row, which has no p50, raised KeyError after the whole GPU run."""
    rows = cuda_rows()
    add_speedups(rows)
    by_name = {r["name"]: r for r in rows}
    for name in BOTH_PATHS:
        want = by_name[f"{name}_torch"]["p50"] / by_name[f"{name}_triton"]["p50"]
        assert by_name[f"{name}_triton"]["speedup"] == want, name
        assert "speedup" not in by_name[f"{name}_torch"]
    for name in [f"{n}_triton" for n in TRITON_ONLY] + ["kind_unattributed_triton", "model_fwd_bwd_triton_compiled"]:
        assert "speedup" not in by_name[name], name
