"""tools/bench_kernels.py on CPU: the PyTorch rows, the bytes model, skewed indices."""
from __future__ import annotations

import json

import torch

from kernels import benchmark as kb


def test_zipf_indices_follow_the_law():
    """Rank r is drawn with probability ~ r**-a: the hottest slot's share matches 1/H(N, a)."""
    n, a, draws = 1000, 1.2, 200_000
    idx = kb.zipf_indices((draws // 4, 4), n, a, "cpu")
    assert idx.shape == (draws // 4, 4) and 0 <= idx.min() and idx.max() < n
    counts = torch.bincount(idx.flatten(), minlength=n).sort(descending=True).values.double()
    harmonic = sum(r ** -a for r in range(1, n + 1))
    for rank in (1, 2, 10):
        expected = draws * rank ** -a / harmonic
        assert abs(counts[rank - 1] - expected) < 5 * expected ** 0.5 + 0.02 * expected


def test_bytes_model_counts_each_gathered_row_once_per_entry():
    s = kb.Shape(tokens=3, heads=2, k=4, n_keys=8, k_dim=16, v_dim=10, dtype=torch.bfloat16)
    M = 3 * 2 * 4
    assert kb.bag_bytes(s, unique_rows=5, backward=False) == M * 10 * 2 + M * (8 + 2) + 3 * 10 * 2
    assert kb.bag_bytes(s, unique_rows=5, backward=True) == M * 10 * 2 + 2 * 5 * 10 * 2 + M * (8 + 4)


def test_cpu_run_writes_json_with_skewed_indices(tmp_path, capsys):
    from tools.bench_kernels import main

    out = tmp_path / "bench.json"
    assert main(["--tokens", "16", "--n-keys", "16", "--k", "4", "--k-dim", "16", "--v-dims", "24",
                               "--repeats", "1", "--index-skew", "1.5", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["triton_skipped"] is True
    bag = [r for r in payload["results"] if r["name"].startswith("bag_")]
    assert {r["name"] for r in bag} >= {"bag_fwd_torch_embedding_bag", "bag_bwd_torch_embedding_bag"}
    assert all(r["index_skew"] == 1.5 and r["max_row_multiplicity"] >= 1 for r in bag)
    assert "Triton timing skipped" in capsys.readouterr().out


def test_unsteady_rows_are_flagged():
    from tools.bench_kernels import format_row

    steady = {"name": "bag_fwd_triton", "v_dim": 2048, "p20": 5.949, "p50": 6.013, "p80": 6.046}
    bimodal = {"name": "bag_fwd_triton", "v_dim": 1024, "p20": 3.003, "p50": 3.902, "p80": 4.002}  # H100, 17b4615
    assert "unsteady" not in format_row(steady)
    assert "unsteady: p80 is 1.33x p20" in format_row(bimodal)
