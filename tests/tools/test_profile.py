"""tools/profile.py on the tiny config writes a Chrome/Perfetto/TensorBoard trace holding the
memory-layer regions, and prints the operator table and the memory layers' share."""

from __future__ import annotations

import json
import re

SMALL = [
    "model.dim=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.max_seq_len=32",
    "model.vocab_size=384",
    "model.memory.layers=[1]",
    "model.memory.n_keys=16",
    "model.memory.heads=2",
    "model.memory.k=4",
    "model.memory.k_dim=16",
    "data.seq_len=32",
    "data.vocab_size=384",
    "data.synthetic.num_entities=40",
    "train.global_batch=4",
    "train.micro_batch=4",
    "train.eval_batches=1",
    "train.probe_limit=4",
]


def test_profile_tool_writes_trace_with_memory_regions(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from tools.profile import main

    run_dir = tmp_path / "run"
    code = main(
        [
            "--config",
            "configs/tiny.yaml",
            "--steps",
            "2",
            *SMALL,
            f"train.run_dir={run_dir}",
            f"data.cache_dir={tmp_path / 'data'}",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    traces = list((run_dir / "profile").glob("*.pt.trace.json"))
    assert len(traces) == 1 and f"trace: {traces[0]}" in out
    trace = json.loads(traces[0].read_text())
    names = [e.get("name", "") for e in trace["traceEvents"]]
    for region in ("memory/scoring", "memory/bag_forward", "train/forward", "train/backward", "train/step"):
        assert names.count(region) >= 2, region  # one per memory layer call in each of the 2 steps (at least)
    assert "memlayers::embedding_bag_backward" in names  # the bag's backward, as the custom op (kernels/ops.py)
    # the region durations nest: every scoring call lies in a training forward or in evaluation
    spans = {
        n: [(e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"] if e.get("name") == n and "dur" in e]
        for n in ("memory/scoring", "train/forward", "eval")
    }
    outer = spans["train/forward"] + spans["eval"]
    assert all(any(f0 <= s0 and s1 <= f1 for f0, f1 in outer) for s0, s1 in spans["memory/scoring"])
    assert any(any(f0 <= s0 and s1 <= f1 for f0, f1 in spans["train/forward"]) for s0, s1 in spans["memory/scoring"])
    shares = dict(re.findall(r"^\s+(scoring|bag_forward|bag_backward|communication)\s+[\d.]+ s\s+([\d.]+)%", out, re.M))
    assert set(shares) == {"scoring", "bag_forward", "bag_backward", "communication"}
    assert 0 < float(shares["scoring"]) < 100 and 0 < float(shares["bag_backward"]) < 100
    assert float(shares["communication"]) == 0.0  # P = 1: no memory-parallel collectives
    assert "aten::mm" in out


def test_profile_refuses_a_run_dir_with_checkpoints(tmp_path, capsys):
    from tools.profile import main

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000001")
    assert main(["--steps", "1", f"train.run_dir={tmp_path / 'run'}"]) == 2
    assert "holds checkpoints" in capsys.readouterr().err
