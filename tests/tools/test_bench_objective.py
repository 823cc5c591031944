"""tools/bench_objective.py on CPU: both rows written, and the compiled objective's peak memory
well below eager's (eager holds the fp32 copy of the logits, its log-softmax and their
gradients; compiled, little beyond the bf16 gradient)."""

from __future__ import annotations

import json

from tools.bench_objective import main


def test_cpu_run_compiled_beside_eager(tmp_path, capsys):
    out = tmp_path / "objective.json"
    argv = ["--batch", "1", "--seq-len", "512", "--vocab", "8192", "--dtype", "bf16", "--repeats", "2"]
    assert main([*argv, "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    eager, compiled = payload["rows"]
    assert payload["device"] == "cpu" and payload["date"] and payload["commit"] != "unknown"
    assert len(eager["times_ms"]) == len(compiled["times_ms"]) == 2  # the raw per-call times
    assert (eager["name"], compiled["name"]) == ("eager", "compiled")
    assert compiled["speedup"] == eager["p50"] / compiled["p50"]
    logits_bytes = 512 * 8192 * 2
    assert eager["peak_extra_bytes"] > 4 * logits_bytes  # fp32 copy + log-softmax + fp32 gradient + bf16 gradient
    assert compiled["peak_extra_bytes"] < 0.5 * eager["peak_extra_bytes"]
    assert "compiled/eager: time" in capsys.readouterr().out
