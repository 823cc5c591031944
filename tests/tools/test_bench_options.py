"""tools/bench_parallel.py, bench_slots.py, bench_data.py: bad options refused when parsed, the
option and the fix named, before any rank is spawned, model built or corpus written. Before,
--configs 2:0 raised ZeroDivisionError and --configs 2 an unpacking ValueError, --steps 0 failed in
statistics.median (bench_slots after building the model; bench_parallel in every spawned rank
after DeepSpeed's start), bench_data --seconds 0 with ZeroDivisionError after the corpus and the
training steps."""

from __future__ import annotations

import importlib

import pytest


def no_work(*args, **kwargs):
    raise AssertionError("work started before the options were checked")


@pytest.mark.parametrize(
    ("tool", "stub", "argv", "named"),
    [
        ("bench_parallel", "run_bench", ["--configs", "2:0"], "world size:P pair"),
        ("bench_parallel", "run_bench", ["--configs", "2"], "e.g. 2:1,2:2"),
        ("bench_parallel", "run_bench", ["--configs", "2:x"], "positive integers"),
        ("bench_parallel", "run_bench", ["--configs", "3:1"], "must divide --global-batch=8"),
        ("bench_parallel", "run_bench", ["--steps", "0"], "--steps"),
        ("bench_parallel", "run_bench", ["--zero-stage", "4"], "--zero-stage"),
        # refused by each spawned rank after DeepSpeed's start, one ConfigError per rank
        ("bench_parallel", "run_bench", ["--n-keys", "8"], "model.memory.k=16 exceeds model.memory.n_keys=8"),
        ("bench_slots", "bench", ["--steps", "0"], "--steps"),
        ("bench_slots", "bench", ["--n-keys", "-1"], "--n-keys"),
        ("bench_slots", "bench", ["--granularity", "chunk:0"], "chunk:<n_tokens>"),
        ("bench_data", "prepare_embedded_dataset", ["--seconds", "0"], "seconds > 0"),
        ("bench_data", "prepare_embedded_dataset", ["--train-steps", "0"], "--train-steps"),
        ("bench_data", "prepare_embedded_dataset", ["--micro-batch", "0"], "--micro-batch"),
        # read after the data rounds: a ConfigError traceback 28 s in
        ("bench_data", "prepare_embedded_dataset", ["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml"),
        # a file as the data cache failed every variant, each after its own start-up (25 s, 2 tracebacks)
        ("bench_train", "run_variant", ["--data-cache", __file__], f"{__file__} is a file, not a folder"),
    ],
)
def test_bad_options_are_refused_when_parsed(tool, stub, argv, named, monkeypatch, capsys):
    module = importlib.import_module(f"tools.{tool}")
    monkeypatch.setattr(module, stub, no_work)
    with pytest.raises(SystemExit) as exit_:
        module.main(argv)
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_configs_parse_into_pairs():
    from tools.bench_parallel import parse_configs

    assert parse_configs("2:1,2:2,4:2") == [(2, 1), (2, 2), (4, 2)]
