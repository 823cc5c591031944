"""tools/bench_values.py at toy shapes: both variants, the PNG, and memory the shapes predict."""

from __future__ import annotations

import json

from tools.bench_values import main


def test_bench_values_runs_both_variants_and_plots(tmp_path, capsys):
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
    assert {(r["slots"], r["variant"]) for r in records} == {
        (s, v) for s in (64, 256) for v in ("adamw", "sparse_adamw")
    }
    for r in records:
        assert 0 < r["rows_read"] <= min(r["slots"], 8 * 2 * 4)
        # the value table and its two Adam moments at least, in fp32
        assert r["resident"] >= 3 * r["slots"] * 16 * 4
        assert r["step_peak"] >= r["resident"]
    out = capsys.readouterr().out
    assert out.count("sparse/dense step time") == 2  # one ratio line per N
