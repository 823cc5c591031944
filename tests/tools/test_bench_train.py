"""tools/bench_train.py on CPU: rows, ratios and reports; a failing variant is a row, not the end."""

from __future__ import annotations

import json

import pytest

from tools.bench_train import add_ratios, main, table, wait_for_worker


def row(model, compile_on, ac, step_s, peak, flops=100.0):
    return {
        "variant": f"{model}/{'compiled' if compile_on else 'eager'}/ac={ac}",
        "model": model,
        "compile": compile_on,
        "ac": ac,
        "median_step_s": step_s,
        "tokens_per_s": 1000 / step_s,
        "peak_flops": 1e6,
        "flops_per_token": flops,
        "peak_memory_bytes": peak,
        "tflops_counted": flops * 1000 / step_s / 1e12,
        "mfu": flops * 1000 / step_s / 1e6,
        "memory_kind": "peak_rss",
    }


def test_ratios_pair_each_variant_with_its_twin():
    rows = [
        row("memory", False, "none", 2.0, 800),
        row("memory", True, "none", 1.5, 700),
        row("memory", False, "full", 2.5, 200),
        row("dense", False, "none", 1.6, 600, flops=80.0),
        {"variant": "dense/eager/ac=full", "model": "dense", "compile": False, "ac": "full", "error": "exit 1: OOM"},
    ]
    ratios = {r["ratio"]: r["value"] for r in add_ratios(rows)}
    assert ratios == {
        "memory/dense step time (eager, ac=none)": pytest.approx(2.0 / 1.6),
        "compiled/eager step time (memory, ac=none)": pytest.approx(1.5 / 2.0),
        "peak memory (memory, eager, ac=full / none)": pytest.approx(200 / 800),
        "step time (memory, eager, ac=full / none)": pytest.approx(2.5 / 2.0),
    }
    # the memory model doing the dense model's work: dense FLOPs/token at its own speed
    assert rows[0]["mfu_dense_equiv"] == pytest.approx(80.0 * 500 / 1e6)
    assert "| dense/eager/ac=full | failed: exit 1: OOM |" in table(rows, add_ratios(rows))


def test_a_failing_variant_is_reported_and_the_others_measured(tmp_path, capsys):
    """The memory model with checkpointing none and full runs the real trainer; its dense
    baseline is a config the trainer refuses, so both dense variants fail: they are rows with
    the error, the memory rows and their ratio are kept, and the exit status is 1."""
    broken = tmp_path / "broken_dense.yaml"
    broken.write_text("model:\n  memory:\n    layers: []\ntrain:\n  zero_stage: 7\n")
    out, md = tmp_path / "bench.json", tmp_path / "bench.md"
    argv = ["--config", "configs/tiny.yaml", "--dense-config", str(broken), "--ac", "none,full"]
    argv += ["--steps", "2", "--warmup", "1", "--rounds", "1", "--data-cache", str(tmp_path / "data")]
    argv += ["--json", str(out), "--markdown", str(md), "train.global_batch=4", "train.micro_batch=4"]
    assert main(argv) == 1
    payload = json.loads(out.read_text())
    assert payload["complete"] is True
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {"memory/eager/ac=none", "memory/eager/ac=full", "dense/eager/ac=none", "dense/eager/ac=full"}
    for name in ("dense/eager/ac=none", "dense/eager/ac=full"):
        assert "zero_stage" in rows[name]["error"]
    for name in ("memory/eager/ac=none", "memory/eager/ac=full"):
        r = rows[name]
        assert "error" not in r and r["steps_measured"] == 2
        assert r["tokens_per_s"] == pytest.approx(4 * 128 / r["median_step_s"])
        assert r["peak_memory_bytes"] > 0 and r["memory_kind"] == "peak_rss" and r["mfu"] is None
    # the prediction beside the measurement: memlayers-model-info's estimate of the same run
    from pretrain.config import load_config
    from pretrain.model.memory_budget import estimate_memory

    for ac in ("none", "full"):
        cfg = load_config(
            "configs/tiny.yaml", ["train.global_batch=4", "train.micro_batch=4", f"train.activation_checkpointing={ac}"]
        )
        assert rows[f"memory/eager/ac={ac}"]["estimated_memory_bytes"] == estimate_memory(cfg, world_size=1).total
    ratios = {q["ratio"]: q["value"] for q in payload["ratios"]}
    full, none = rows["memory/eager/ac=full"], rows["memory/eager/ac=none"]
    assert (
        ratios["peak memory (memory, eager, ac=full / none)"] == full["peak_memory_bytes"] / none["peak_memory_bytes"]
    )
    assert not any(name.startswith("memory/dense") for name in ratios)
    text = md.read_text()
    assert "| dense/eager/ac=none | failed: exit 1:" in text and "incomplete" not in text
    assert "FAILED exit 1" in capsys.readouterr().out


def test_value_optimizers_are_memory_variants_each_against_the_dense_baseline(tmp_path):
    """--value-optimizers adds one memory variant per value optimizer (the dense model has no
    pool): the trainer ran each with that optimizer, and each gets its own memory/dense ratio."""
    out = tmp_path / "bench.json"
    argv = ["--config", "configs/tiny.yaml", "--value-optimizers", "adamw,sparse_rowwise_adamw"]
    argv += ["--steps", "1", "--warmup", "0", "--rounds", "1", "--data-cache", str(tmp_path / "data")]
    argv += ["--json", str(out), "train.global_batch=2", "train.micro_batch=2"]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == {
        "memory/eager/ac=none/values=adamw",
        "memory/eager/ac=none/values=sparse_rowwise_adamw",
        "dense/eager/ac=none",
    }
    assert rows["memory/eager/ac=none/values=sparse_rowwise_adamw"]["value_optimizer"] == "sparse_rowwise_adamw"
    assert rows["memory/eager/ac=none/values=adamw"]["value_optimizer"] == "adamw"
    assert rows["dense/eager/ac=none"]["value_optimizer"] is None
    ratios = {q["ratio"]: q["value"] for q in payload["ratios"]}
    for values in ("adamw", "sparse_rowwise_adamw"):
        memory = rows[f"memory/eager/ac=none/values={values}"]
        got = ratios[f"memory/dense step time (eager, ac=none, values={values})"]
        assert got == memory["median_step_s"] / rows["dense/eager/ac=none"]["median_step_s"]
    with pytest.raises(SystemExit, match="not among adamw, sparse_adamw, sparse_rowwise_adamw"):
        main(["--config", "configs/tiny.yaml", "--value-optimizers", "sgd"])


def test_train_peak_flops_sets_the_mfu_peak_as_in_the_trainer(tmp_path):
    """train.peak_flops (for a GPU missing from pretrain/metrics.py's table) is MFU's peak in the
    trainer; bench_train ignored it and reported MFU n/a for such a GPU. On the CPU, which has no
    peak of its own, the override is the peak: MFU = counted FLOPs per token x tokens/s / 1e12."""
    out = tmp_path / "bench.json"
    argv = ["--config", "configs/tiny.yaml", "--models", "memory", "--steps", "1", "--warmup", "0", "--rounds", "1"]
    argv += ["--data-cache", str(tmp_path / "data"), "--json", str(out)]
    argv += ["train.global_batch=2", "train.micro_batch=2", "train.peak_flops=1e12"]
    assert main(argv) == 0
    (r,) = json.loads(out.read_text())["rows"]
    assert r["peak_flops"] == 1e12
    assert r["mfu"] == pytest.approx(r["flops_per_token"] * 2 * 128 / r["median_step_s"] / 1e12, rel=1e-12)


def test_json_records_date_commit_and_torch_and_a_folder_is_refused_when_parsed(tmp_path, capsys):
    """The JSON had rows and settings only (no date, commit or torch version, which the other
    benchmarks record through kernels.benchmark.run_info), and --json naming a folder failed only
    at the first write, after a variant had run."""
    import argparse

    import pytest
    import torch

    from tools.bench_train import main, report

    out = tmp_path / "bench.json"
    report(argparse.Namespace(json=out, markdown=None), [], final=True)
    payload = json.loads(out.read_text())
    assert payload["torch"] == torch.__version__ and payload["commit"] not in ("", "unknown")
    assert payload["date"].endswith("Z") and payload["complete"] is True
    for option in ("--json", "--markdown"):
        with pytest.raises(SystemExit) as exit_:
            main(["--config", "configs/tiny.yaml", option, str(tmp_path)])
        assert exit_.value.code == 2 and f"{tmp_path} is a folder" in capsys.readouterr().err


def test_a_terminated_driver_ends_its_worker(tmp_path):
    """gpu_check stops a stage with SIGTERM at its time limit. The driver must not leave its
    variant's worker training on (the trainer takes SIGTERM as 'stop after this step', which in a
    compiling first step is a minute away) beside the next stage: it kills and waits for it."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    root = Path(__file__).resolve().parents[2]
    argv = ["--config", "configs/tiny.yaml", "--models", "memory", "--steps", "100000", "--rounds", "1"]
    argv += ["--data-cache", str(tmp_path / "data"), "train.global_batch=4", "train.micro_batch=4"]
    driver = subprocess.Popen([sys.executable, str(root / "tools" / "bench_train.py"), *argv], cwd=root)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while not workers and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(0.2)
            workers = [p for p in psutil.Process(driver.pid).children() if "--worker" in p.cmdline()]
        assert workers, "the driver started no worker"
        time.sleep(1.0)  # the worker is under way (importing, preparing data or training)
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, "the worker outlived its driver"
        assert driver.returncode == 128 + signal.SIGTERM  # SystemExit: the driver's own exit, after the worker's
    finally:
        for p in workers:
            if p.is_running():
                p.kill()
        if driver.poll() is None:
            driver.kill()


def test_a_worker_that_does_not_exit_after_its_result_is_ended_and_its_result_kept(tmp_path):
    """A worker that hangs at exit after writing its result (torch 2.11's compile-worker sidecar
    held one for 300 s) is killed, with its own helper process, `grace_s` after the result; the
    driver keeps the result instead of losing it, and every variant after it, at the stage's limit."""
    import subprocess
    import sys
    import time

    import psutil

    from pretrain.process_tree import children_of

    out = tmp_path / "worker.json"
    code = (
        "import subprocess, sys, time, pathlib; "
        "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
        f"pathlib.Path({str(out)!r}).write_text('{{}}'); time.sleep(600)"
    )
    worker = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 60
        while not (out.is_file() and children_of(worker.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        helpers = [psutil.Process(pid) for pid in children_of(worker.pid)]
        assert out.is_file() and helpers, "the stand-in worker did not start"
        note = wait_for_worker(worker, out, grace_s=0.5)
        assert note and "killed" in note
        assert worker.returncode == -9
        gone, alive = psutil.wait_procs(helpers, timeout=10)
        assert not alive, "the worker's helper outlived it"
    finally:
        worker.kill()
        worker.wait()


def test_a_worker_that_exits_is_waited_for_without_a_note(tmp_path):
    import subprocess
    import sys

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    assert wait_for_worker(worker, tmp_path / "absent.json", grace_s=0.5) is None
    assert worker.returncode == 0


def test_a_stop_just_after_the_worker_was_reaped_signals_no_process(tmp_path, monkeypatch):
    """The stage's SIGTERM (SystemExit) arriving just after the worker's exit was collected: its
    process id is free then, maybe another process's already, and must get no SIGKILL."""
    import os
    import subprocess
    import sys

    import pretrain.process_tree as process_tree

    class StoppedAsItExits(subprocess.Popen):
        def wait(self, timeout=None):
            super().wait()  # the worker has exited and is reaped ...
            raise SystemExit(143)  # ... when the stage's SIGTERM ends the driver

    signalled = []
    monkeypatch.setattr(process_tree.os, "kill", lambda pid, sig: signalled.append(pid))
    monkeypatch.setattr(process_tree.signal, "pidfd_send_signal", lambda fd, sig: signalled.append(fd), raising=False)
    worker = StoppedAsItExits([sys.executable, "-c", "pass"])
    with pytest.raises(SystemExit):
        wait_for_worker(worker, tmp_path / "absent.json", grace_s=0.5)
    assert worker.pid not in signalled and os.getpid() not in signalled
    assert signalled == []


def test_a_helpers_id_given_to_another_process_before_the_kill_is_not_signalled(monkeypatch):
    """kill_child_tree listed the worker's descendants by id, then SIGKILLed those ids: a helper that
    exited and was collected in between left its id to the next process started, which got the SIGKILL.
    Here the listing names a stranger (a process of the test's own, not the worker's) among the
    worker's children, as a listing made just before the helper's id was given again would: the
    stranger lives on; the worker and its real helper are killed. Needs pidfds (Linux >= 5.3)."""
    import os
    import subprocess
    import sys
    import time

    import psutil

    import pretrain.process_tree as process_tree

    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        pytest.skip("no pidfds here: processes are signalled by id")
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    worker = subprocess.Popen(
        [sys.executable, "-c", f"import subprocess, time; subprocess.Popen({sleeper!r}); time.sleep(600)"]
    )
    stranger = subprocess.Popen(sleeper)
    try:
        deadline = time.monotonic() + 60
        while not process_tree.children_of(worker.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        helpers = [psutil.Process(pid) for pid in process_tree.children_of(worker.pid)]
        assert helpers, "the stand-in worker did not start its helper"
        listed = process_tree.children_of
        monkeypatch.setattr(
            process_tree, "children_of", lambda pid: listed(pid) + ([stranger.pid] if pid == worker.pid else [])
        )
        process_tree.kill_child_tree(worker)
        assert worker.wait(timeout=10) == -9
        gone, alive = psutil.wait_procs(helpers, timeout=10)
        assert not alive, "the worker's helper outlived it"
        time.sleep(0.2)
        assert stranger.poll() is None, "the stranger holding a listed id was killed"
    finally:
        for process in (worker, stranger):
            process.kill()
            process.wait()
