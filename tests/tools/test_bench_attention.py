"""tools/bench_attention.py on CPU: packed document ids, the kept share of the causal mask, the rows."""

from __future__ import annotations

import json

import pytest
import torch

from tools.bench_attention import kept_fraction, main, packed_doc_ids


def test_documents_are_packed_back_to_back_with_the_mean_length():
    ids = packed_doc_ids(4, 4096, mean_length=64.0, seed=1)
    assert ids.shape == (4, 4096)
    for row in ids:
        steps = torch.diff(row)
        assert set(steps.tolist()) <= {0, 1} and int(row[0]) == 0  # ids rise by one at each boundary
        lengths = torch.unique_consecutive(row, return_counts=True)[1][:-1].double()  # the last is cut
        assert 40 < lengths.mean().item() < 90  # exponential, mean 64 (of about 60 documents)


def test_kept_fraction_counts_query_key_pairs_of_one_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2]])
    # causal pairs: 6*7/2 = 21; within documents: 3*4/2 + 2*3/2 + 1 = 10
    assert kept_fraction(ids) == 10 / 21
    assert kept_fraction(torch.zeros(2, 8, dtype=torch.long)) == 1.0


def test_cpu_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "attention.json"
    argv = ["--batch", "1", "--seq-len", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "16"]
    assert main([*argv, "--doc-lengths", "8,32", "--repeats", "1", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload["rows"]
    assert payload["device"] == "cpu" and payload["date"] and payload["commit"] != "unknown"
    assert all(len(r["times_ms"]) == 1 for r in rows)  # the raw per-call times
    assert [r["name"] for r in rows] == ["sdpa_causal"] + ["sdpa_dense_document_mask", "flex_block_mask"] * 2
    assert [r["mean_doc_length"] for r in rows[1:]] == [8.0, 8.0, 32.0, 32.0]
    assert all(r["p50"] > 0 for r in rows) and rows[2]["speedup"] == rows[1]["p50"] / rows[2]["p50"]
    assert "forward (no FlexAttention backward on CPU)" in capsys.readouterr().out


def test_rows_are_printed_and_written_as_they_are_measured(tmp_path, monkeypatch, capsys):
    """A run cut short (gpu_check's attention stage has a time limit) keeps the rows measured so
    far: the table was printed and the JSON written only at the end before."""
    import tools.bench_attention as bench

    out = tmp_path / "attention.json"
    real, built = bench.document_block_mask, []

    def build_then_stop(doc_ids):
        built.append(doc_ids)
        if len(built) == 2:  # the second document length: the stage's time runs out
            raise KeyboardInterrupt
        return real(doc_ids)

    monkeypatch.setattr(bench, "document_block_mask", build_then_stop)
    argv = ["--batch", "1", "--seq-len", "32", "--heads", "2", "--head-dim", "8", "--repeats", "1"]
    with pytest.raises(KeyboardInterrupt):
        bench.main([*argv, "--doc-lengths", "8,16", "--json", str(out)])
    measured = ["sdpa_causal", "sdpa_dense_document_mask", "flex_block_mask"]
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert printed == measured
    assert [r["name"] for r in json.loads(out.read_text())["rows"]] == measured


def test_the_block_mask_build_is_timed_on_an_idle_device(tmp_path, monkeypatch):
    """block_mask_build_ms is one build's wall time with the device idle before and after it: the
    clock started while the ids' copy and the dense mask's kernels were still queued, and the
    synchronize after the build waited for them too."""
    import tools.bench_attention as bench
    from kernels import benchmark as kb

    events = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(kb.time, "perf_counter", lambda: events.append("clock") or float(len(events)))
    out, ms = kb.time_once_ms(lambda: events.append("build") or "mask", torch.device("cuda"))
    assert (out, events) == ("mask", ["sync", "clock", "build", "sync", "clock"])
    assert ms == (5 - 2) * 1e3
    monkeypatch.undo()

    timed, real = [], kb.time_once_ms

    def recording(fn, device):
        out, ms = real(fn, device)
        timed.append(type(out).__name__)
        return out, ms

    monkeypatch.setattr(kb, "time_once_ms", recording)
    argv = ["--batch", "1", "--seq-len", "32", "--heads", "2", "--head-dim", "8", "--repeats", "1"]
    assert bench.main([*argv, "--doc-lengths", "8", "--json", str(tmp_path / "a.json")]) == 0
    assert timed == ["BlockMask"]
