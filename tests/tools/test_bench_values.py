"""tools/bench_values.py at toy shapes: every variant, the PNG, and memory the shapes predict."""

from __future__ import annotations

import json

import pytest

from pretrain.parallel.value_bench import SPARSE_VARIANTS, VARIANTS
from tools.bench_values import main


def test_bench_values_runs_every_variant_and_plots(tmp_path, capsys):
    png = tmp_path / "values.png"
    args = [
        "--n-keys",
        "8,16",
        "--v-dim",
        "16",
        "--dim",
        "32",
        "--k-dim",
        "16",
        "--heads",
        "2",
        "--k",
        "4",
        "--batch",
        "1",
        "--seq-len",
        "8",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--layer-n-keys",
        "0",
        "--plot",
        str(png),
    ]
    assert main(args) == 0
    assert png.stat().st_size > 0
    records = json.loads(png.with_suffix(".json").read_text())
    assert {(r["slots"], r["variant"]) for r in records} == {(s, v) for s in (64, 256) for v in VARIANTS}
    # bytes per value row held between steps: the table and its optimizer state (fp32 unless :bf16)
    held_per_row = {
        "adamw": 3 * 16 * 4,
        "sparse_adamw": 3 * 16 * 4,
        "sparse_rowwise_adamw": 2 * 16 * 4 + 4,
        "sparse_rowwise_adamw:bf16": 16 * 4 + 16 * 2 + 4,
    }
    for r in records:
        assert 0 < r["rows_read"] <= min(r["slots"], 8 * 2 * 4)
        assert r["resident"] >= r["slots"] * held_per_row[r["variant"]]
        assert r["step_peak"] >= r["resident"]
    by = {(r["slots"], r["variant"]): r["resident"] for r in records}
    assert by[256, "sparse_rowwise_adamw:bf16"] < by[256, "sparse_rowwise_adamw"] < by[256, "sparse_adamw"]
    out = capsys.readouterr().out
    assert out.count("/adamw step time") == 2 * len(SPARSE_VARIANTS)  # one ratio line per N and sparse variant


def test_bench_values_refuses_an_unknown_variant():
    with pytest.raises(SystemExit, match="unknown \\['sgd'\\]"):
        main(["--variants", "adamw,sgd", "--n-keys", "8"])
