"""tools/bench_generate.py: a tiny run writes its JSON (into a folder not made yet); bad numbers
and a folder as --json are refused before any model is built or timed."""

from __future__ import annotations

import json

import pytest

import tools.bench_generate as bench


def test_tiny_run_writes_json_into_a_new_folder(tmp_path):
    out = tmp_path / "new" / "generate.json"
    argv = ["--prompt-tokens", "4", "--new-tokens", "3", "--rounds", "1", "--batches", "1", "--json", str(out)]
    assert bench.main(argv) == 0
    payload = json.loads(out.read_text())
    assert payload["device"] == "cpu" and payload["date"] and payload["commit"] != "unknown"
    rows = payload["generation"]
    for row in rows:  # every rate recomputes from the raw round times stored beside it
        for clock in ("wall", "cpu"):
            cached, uncached = row[f"cached_{clock}_s"], row[f"uncached_{clock}_s"]
            assert len(cached) == len(uncached) == 1 and row["tokens"] == row["batch"] * 3
            assert row[f"cached_tok_s_{clock}"] == row["tokens"] / cached[0]
            assert row[f"speedup_{clock}"] == uncached[0] / cached[0]
    assert [r["case"] for r in rows] == ["hf generate() batch 1", "pretrain.export generate batch 1"]


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--rounds", "0"], "--rounds"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--batches", "1,x"], "--batches"),
        (["--batches", "0"], "--batches"),
        (["--json", "FOLDER"], "--json"),
        # memlayers-eval refused these only after every timing round had run
        (["--lm-eval", "FOLDER/missing"], "--lm-eval: no such export directory"),
        (["--lm-eval", "RUN"], "is a training run or checkpoint, not an export"),
    ],
)
def test_bad_options_are_refused_before_the_benchmark(tmp_path, monkeypatch, capsys, extra, option):
    monkeypatch.setattr(bench, "build_models", lambda *a, **k: pytest.fail("models built"))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    extra = [word.replace("FOLDER", str(tmp_path)).replace("RUN", str(tmp_path / "run")) for word in extra]
    with pytest.raises(SystemExit) as stop:
        bench.main(extra)
    assert stop.value.code == 2
    assert option in capsys.readouterr().err
