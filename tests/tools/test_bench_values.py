"""tools/bench_values.py at toy shapes: every variant, the PNG, and memory the shapes predict."""

from __future__ import annotations

import json

import pytest

from pretrain.bench.values import SPARSE_VARIANTS, VARIANTS
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
        "--micro-batches",
        "2",  # the sparse variants add the second micro-batch's rows to the first's
        "--repeats",
        "3",
        "--threads",
        "1",
        "--layer-n-keys",
        "0",
        "--plot",
        str(png),
    ]
    assert main(args) == 0
    assert png.stat().st_size > 0
    payload = json.loads(png.with_suffix(".json").read_text())
    assert payload["device"] == "cpu" and payload["date"] and payload["commit"] != "unknown"
    records = payload["records"]
    for r in records:  # each median recomputes from the raw samples stored beside it
        assert len(r["step_times_s"]) == len(r["step_cpu_times_s"]) == len(r["step_extra_samples"]) == 3
        assert r["step_s"] == sorted(r["step_times_s"])[1] and r["step_cpu_s"] == sorted(r["step_cpu_times_s"])[1]
        assert r["step_extra"] == sorted(r["step_extra_samples"])[1]
        assert r["step_peak"] == r["resident"] + r["step_extra"]
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
    assert "2 micro-batches of 1 x 8 tokens" in out
    assert out.count("/adamw step time") == 2 * len(SPARSE_VARIANTS)  # one ratio line per N and sparse variant


def test_bench_values_refuses_an_unknown_variant():
    with pytest.raises(SystemExit, match="unknown \\['sgd'\\]"):
        main(["--variants", "adamw,sgd", "--n-keys", "8"])


@pytest.mark.parametrize(
    ("argv", "named"),
    [(["--repeats", "0"], "--repeats"), (["--batch", "0"], "--batch"), (["--plot", "{tmp}"], "bench_values.png")],
)
def test_bench_values_refuses_bad_options_when_parsed(argv, named, tmp_path, monkeypatch, capsys):
    """--repeats 0 failed in statistics.median after every model was built and stepped, a folder
    as --plot after the whole sweep; both now at parsing, the option named."""
    import pretrain.bench.values as value_bench

    monkeypatch.setattr(value_bench, "_StepRunner", None)  # any model built would fail loudly
    with pytest.raises(SystemExit) as exit_:
        main(["--n-keys", "8", *[a.format(tmp=tmp_path) for a in argv]])
    assert exit_.value.code == 2 and named in capsys.readouterr().err


def test_pool_bytes_match_the_tensors_each_variant_holds():
    """value_bytes_per_slot against the real value shard and optimizer state after a step
    (plus, for dense adamw, the value gradient the backward leaves before the step)."""
    import torch

    from pretrain.bench.values import StepSpec, _StepRunner, value_bytes_per_slot

    spec = StepSpec(n_keys=(8,), v_dim=16, dim=32, heads=2, k=4, k_dim=16, batch=1, seq_len=8)
    for variant in VARIANTS:
        runner = _StepRunner(spec, 8, variant)
        runner.step()
        tensors = list(runner.values.parameters())
        tensors += [t for st in runner.values.optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
        held = sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)  # not the step counter
        if variant == "adamw":
            held += sum(p.numel() * p.element_size() for p in runner.values.parameters())  # its dense gradient
        assert held == 64 * value_bytes_per_slot(variant, 16), variant


def test_bench_values_refuses_pools_larger_than_the_free_memory(monkeypatch):
    import tools.bench_values as bench_values
    from pretrain.bench.values import StepSpec, pool_bytes

    spec = StepSpec(v_dim=64)
    free = pool_bytes(spec, 256) + 1  # 256 fits, 1024 does not
    monkeypatch.setattr(bench_values, "available_bytes", lambda device: free)
    monkeypatch.setattr(bench_values, "step_sweep", None)  # nothing may be built
    with pytest.raises(SystemExit, match=r"--n-keys 1024: .* drop 1024 from --n-keys, or name fewer --variants"):
        bench_values.main(["--n-keys", "256,1024", "--v-dim", "64"])
