"""tools/profile.py on the tiny config writes a Chrome/Perfetto/TensorBoard trace holding the
memory-layer regions, and prints the operator table and the memory layers' share."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.train.helpers import TINY


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
            *TINY,
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
    # the closing evaluation asks no fact probe: it asked one, and printed that probe's chance
    # (0.0625, a profession question) beside the demo's 4.1% over 200 probes
    assert re.search(r"eval val_loss [\d.]+ val_perplexity [\d.]+\n", out)
    assert "fact_recall" not in out


def test_a_file_as_trace_dir_or_run_dir_is_an_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    """--trace-dir naming a file trained and profiled, then crashed with FileExistsError; a
    train.run_dir naming a file ended in the run lock's RunDirBusy traceback."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import pretrain.profiling as profiling
    from tools.profile import main

    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    monkeypatch.setattr(profiling, "profile_training", lambda *a: pytest.fail("the profile ran"))
    with pytest.raises(SystemExit) as exit_:
        main(["--steps", "1", "--trace-dir", str(a_file), f"train.run_dir={tmp_path / 'run'}"])
    assert (
        exit_.value.code == 2 and f"argument --trace-dir: {a_file} is a file, not a folder" in capsys.readouterr().err
    )
    monkeypatch.undo()
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    run_dir_file = [*TINY, f"train.run_dir={a_file}", f"data.cache_dir={tmp_path / 'data'}"]
    assert main(["--config", "configs/tiny.yaml", "--steps", "1", *run_dir_file]) == 2
    assert (
        f"error: train.run_dir={a_file} cannot be written: {a_file} is a file, not a folder" in capsys.readouterr().err
    )
    assert a_file.read_text() == "x"


def test_a_broken_slurm_environment_is_an_error_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Run in a Slurm step whose environment the trainer refuses (SlurmEnvError: the trainer's main
    says 'error: ...', exit 2), profile ended in the traceback: it caught its own copy of main's list."""
    from tools.profile import main

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("RANK", raising=False)
    for name, value in (("SLURM_JOB_ID", "1"), ("SLURM_STEP_ID", "0"), ("SLURM_PROCID", "x")):
        monkeypatch.setenv(name, value)
    argv = ["--config", "configs/tiny.yaml", "--steps", "1", *TINY, f"train.run_dir={tmp_path / 'run'}"]
    assert main([*argv, f"data.cache_dir={tmp_path / 'data'}"]) == 2
    assert "error: SLURM_PROCID='x' is not an integer" in capsys.readouterr().err


def test_skipping_every_profiled_step_is_refused_naming_the_options(tmp_path, capsys):
    """--steps 3 --skip-steps 3 said 'error: steps=3 must be positive and skip_steps=3 in [0, steps)'
    (the library's argument names) after the config was loaded; now a usage error before anything
    runs, naming both options and a pair that works."""
    from tools.profile import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--steps", "3", "--skip-steps", "3", f"train.run_dir={tmp_path / 'run'}"])
    assert exit_info.value.code == 2 and not (tmp_path / "run").exists()
    assert (
        "--skip-steps 3 leaves none of the --steps 3 to summarise: skip fewer steps than are profiled "
        "(e.g. --steps 6 --skip-steps 3)" in capsys.readouterr().err
    )


def test_profile_refuses_a_run_dir_with_checkpoints(tmp_path, capsys):
    from tools.profile import main

    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_00000001")
    assert main(["--steps", "1", f"train.run_dir={tmp_path / 'run'}"]) == 2
    assert "holds checkpoints" in capsys.readouterr().err


def test_with_a_gpu_operators_rank_by_their_kernels_time():
    """summarize on hand-made events: with device times the ranking and the busy total are the
    kernels' (a CPU-heavy launcher with a short kernel ranks low); without them, CPU self time."""
    from types import SimpleNamespace

    from pretrain.profiling import format_report, summarize

    def event(name, start, end, cpu_us, device_us):
        span = SimpleNamespace(start=start, end=end)
        return SimpleNamespace(name=name, time_range=span, self_cpu_time_total=cpu_us, self_device_time_total=device_us)

    events = [
        event("train/forward", 0, 1000, 5, 0),
        event("aten::mm", 10, 20, 5, 600),
        event("aten::mm", 30, 40, 5, 200),
        event("launcher", 50, 900, 800, 10),
        event("outside", 2000, 2100, 50, 999),  # not in a step
    ]
    report = summarize(events, Path("t.json"))
    assert report.time_kind == "device" and report.step_time_s == pytest.approx(1000e-6)
    assert report.top_ops[0] == ("aten::mm", pytest.approx(800e-6), 2)
    assert report.top_ops[1] == ("launcher", pytest.approx(10e-6), 1)
    assert report.device_busy_s == pytest.approx(810e-6)
    assert "device busy 0.001 s of the steps' 0.001 s (81.0%" in format_report(report)
    for e in events:
        e.self_device_time_total = 0
    report = summarize(events, Path("t.json"))
    assert report.time_kind == "cpu" and report.device_busy_s is None
    assert report.top_ops[0] == ("launcher", pytest.approx(800e-6), 1)


def test_skip_steps_leaves_the_first_steps_out():
    """Two steps of 100 µs kernel time each, the first with a 900 µs compile-time op: skipping
    one step keeps only the second step's events; skipping both is refused."""
    from types import SimpleNamespace

    from pretrain.profiling import summarize

    def event(name, start, end, device_us=0):
        span = SimpleNamespace(start=start, end=end)
        return SimpleNamespace(name=name, time_range=span, self_cpu_time_total=1, self_device_time_total=device_us)

    events = [event("train/forward", 0, 1000), event("compile", 5, 900, 900), event("train/step", 1000, 1010)]
    events += [event("train/forward", 1010, 1200), event("aten::mm", 1020, 1100, 100), event("train/step", 1200, 1210)]
    report = summarize(events, Path("t.json"), skip_steps=1)
    assert [name for name, _, _ in report.top_ops] == ["aten::mm"]
    assert report.step_time_s == pytest.approx(200e-6) and report.device_busy_s == pytest.approx(100e-6)
    assert summarize(events, Path("t.json")).device_busy_s == pytest.approx(1000e-6)
    with pytest.raises(ValueError, match="leaves none"):
        summarize(events, Path("t.json"), skip_steps=2)


def test_skip_steps_counts_optimizer_steps_under_gradient_accumulation(tmp_path, monkeypatch):
    """Two micro-batches per step: skip_steps=1 leaves out both micro-batches of the first optimizer
    step, so the summary's step time is that of the train/* regions from the second step's first
    forward on (the 3rd forward of the trace), and no more."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import pretrain.profiling as profiling
    from pretrain.config import load_config

    seen, real_summarize = {}, profiling.summarize

    def spy(events, trace, **kwargs):
        seen["events"] = list(events)
        return real_summarize(seen["events"], trace, **kwargs)

    monkeypatch.setattr(profiling, "summarize", spy)
    overrides = [*TINY, "train.global_batch=8", f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path}"]
    report = profiling.profile_training(load_config("configs/tiny.yaml", overrides), steps=2, skip_steps=1)
    forwards = sorted(e.time_range.start for e in seen["events"] if e.name == "train/forward")
    assert len(forwards) == 4  # 2 steps x 2 micro-batches
    second_step = [
        e for e in seen["events"] if e.name.startswith("train/") and e.time_range.start >= forwards[2]
    ]  # the train/* regions do not nest
    expected = sum(e.time_range.end - e.time_range.start for e in second_step) / 1e6
    assert report.step_time_s == pytest.approx(expected, rel=1e-9)


def test_the_scoring_backward_s_embedding_bag_kernels_are_not_bag_backward():
    """The PyTorch scoring backward (memlayers::pkm_topk_backward) computes the half-key gradients
    with aten::_embedding_bag_backward: that time is the scoring's. Before, it was counted as the
    value bag's backward (on the tiny config's CPU profile, 35% of the reported bag_backward)."""
    from types import SimpleNamespace

    from pretrain.profiling import format_report, summarize

    def event(name, start, end):
        span = SimpleNamespace(start=start, end=end)
        return SimpleNamespace(name=name, time_range=span, self_cpu_time_total=end - start, self_device_time_total=0)

    events = [
        event("train/backward", 0, 1000),
        event("memlayers::embedding_bag_backward", 100, 300),  # the value bag: 200 µs
        event("aten::_embedding_bag_per_sample_weights_backward", 110, 150),
        event("aten::_embedding_bag_dense_backward", 160, 290),
        event("memlayers::pkm_topk_backward", 400, 800),  # the scoring: 400 µs
        event("aten::_embedding_bag_backward", 420, 500),  # keys1's gradient
        event("aten::_embedding_bag_dense_backward", 425, 495),
        event("aten::_embedding_bag_backward", 550, 650),  # keys2's gradient
        event("EmbeddingBagBackward0", 900, 950),  # a reference-path bag backward: 50 µs
    ]
    report = summarize(events, Path("t.json"))
    assert report.memory_time_s["bag_backward"] == pytest.approx((200 + 50) * 1e-6)
    assert report.memory_time_s["scoring_backward"] == pytest.approx(400 * 1e-6)
    assert re.search(r"^\s+scoring_backward\s+0.0004 s\s+40.00%$", format_report(report), re.M)


def test_a_memory_region_never_recorded_is_not_reported_as_no_time():
    """A compiled block runs without its record_function regions (train.compile: the GPU check's
    profile stage), so memory/scoring and memory/bag_forward are absent from the events. The report
    said 0.0000 s (0.00%) for them, read as 'the scoring costs nothing'; it says 'not seen' and why."""
    from types import SimpleNamespace

    from pretrain.profiling import format_report, summarize

    def event(name, start, end):
        span = SimpleNamespace(start=start, end=end)
        return SimpleNamespace(name=name, time_range=span, self_cpu_time_total=end - start, self_device_time_total=0)

    compiled = [event("train/forward", 0, 1000), event("memlayers::pkm_topk_backward", 100, 300)]
    text = format_report(summarize(compiled, Path("t.json")))
    assert re.search(r"^\s+scoring\s+not seen$", text, re.M) and re.search(r"^\s+bag_forward\s+not seen$", text, re.M)
    assert "a compiled block (train.compile) runs without its record_function regions" in text
    assert re.search(r"^\s+scoring_backward\s+0.0002 s\s+20.00%$", text, re.M)  # a custom op: recorded
    eager = [*compiled, event("memory/scoring", 400, 500), event("memory/bag_forward", 500, 550)]
    text = format_report(summarize(eager, Path("t.json")))
    assert re.search(r"^\s+scoring\s+0.0001 s\s+10.00%$", text, re.M) and "not seen:" not in text
    assert re.search(r"^\s+communication\s+0.0000 s\s+0.00%$", text, re.M)  # P = 1: no collectives, none due


def test_a_dense_model_s_profile_says_it_has_no_memory_layers(tmp_path, monkeypatch, capsys):
    """Profiling configs/tiny_dense.yaml (the baseline one profiles beside the memory model) printed
    the memory table with scoring and bag_forward 'not seen' and the note that a compiled block drops
    its regions: a model with no memory layer, run eagerly, read as one whose memory time was hidden."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from tools.profile import main

    dense = [o for o in TINY if not o.startswith("model.memory.")] + ["model.memory.layers=[]"]
    run = ["--steps", "2", *dense, f"train.run_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'data'}"]
    assert main(["--config", "configs/tiny_dense.yaml", *run]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^memory layers: none in this model \(model.memory.layers is empty\); [\d.]+ s in ", out, re.M)
    assert "not seen" not in out and "compiled block" not in out and "scoring" not in out
