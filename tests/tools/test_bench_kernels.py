"""tools/bench_kernels.py on CPU: the PyTorch rows, the bytes model, skewed indices."""

from __future__ import annotations

import json

import pytest
import torch

from kernels import benchmark as kb
from pretrain.config import load_config


def test_zipf_indices_follow_the_law():
    """Rank r is drawn with probability ~ r**-a: the hottest slot's share matches 1/H(N, a)."""
    n, a, draws = 1000, 1.2, 200_000
    idx = kb.zipf_indices((draws // 4, 4), n, a, "cpu")
    assert idx.shape == (draws // 4, 4) and 0 <= idx.min() and idx.max() < n
    counts = torch.bincount(idx.flatten(), minlength=n).sort(descending=True).values.double()
    harmonic = sum(r**-a for r in range(1, n + 1))
    for rank in (1, 2, 10):
        expected = draws * rank**-a / harmonic
        assert abs(counts[rank - 1] - expected) < 5 * expected**0.5 + 0.02 * expected


def test_bytes_model_counts_each_gathered_row_once_per_entry():
    s = kb.Shape(tokens=3, heads=2, k=4, n_keys=8, k_dim=16, v_dim=10, dtype=torch.bfloat16)
    M = 3 * 2 * 4
    assert kb.bag_bytes(s, unique_rows=5, backward=False) == M * 10 * 2 + M * (8 + 2) + 3 * 10 * 2
    assert kb.bag_bytes(s, unique_rows=5, backward=True) == M * 10 * 2 + 2 * 5 * 10 * 2 + M * (8 + 4)


def test_cpu_run_writes_json_with_skewed_indices(tmp_path, capsys):
    from tools.bench_kernels import main

    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "--tokens",
                "16",
                "--n-keys",
                "16",
                "--k",
                "4",
                "--k-dim",
                "16",
                "--v-dims",
                "24",
                "--repeats",
                "1",
                "--index-skew",
                "1.5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    payload = json.loads(out.read_text())
    assert payload["triton_skipped"] is True
    # the options under "settings", as every bench tool writes them (kernels.benchmark.write_results)
    assert "args" not in payload
    assert payload["settings"]["index_skew"] == "1.5" and payload["settings"]["v_dims"] == "[24]"
    assert {"device", "date", "commit", "torch"} <= payload.keys()
    bag = [r for r in payload["results"] if r["name"].startswith("bag_")]
    assert {r["name"] for r in bag} >= {"bag_fwd_torch_embedding_bag", "bag_bwd_torch_embedding_bag"}
    assert all(r["index_skew"] == 1.5 and r["max_row_multiplicity"] >= 1 for r in bag)
    assert "Triton timing skipped" in capsys.readouterr().out


def test_unsteady_rows_are_flagged():
    from tools.bench_kernels import format_row

    steady = {"name": "bag_fwd_triton", "v_dim": 2048, "p20": 5.949, "p50": 6.013, "p80": 6.046}
    bimodal = {"name": "bag_fwd_triton", "v_dim": 1024, "p20": 3.003, "p50": 3.902, "p80": 4.002}  # H100, 17b4615
    assert "unsteady" not in format_row(steady)
    assert "unsteady: p80 is 1.33x p20" in format_row(bimodal)


def test_unsteady_timings_are_rerun_and_the_steadiest_kept():
    """A measurement whose p80/p20 exceeds 1.15 is repeated; the steadiest attempt is kept
    and every attempt is reported; a steady first attempt is not repeated."""
    bimodal, noisy, steady = [1.0, 1.0, 2.0, 2.0, 1.0, 2.0], [1.0, 1.3, 1.0, 1.3, 1.1], [3.0, 3.1, 3.0, 3.05, 3.0]
    script = iter([bimodal, noisy, steady, [9.0] * 5])
    times, attempts = kb.time_steady(lambda: next(script), reruns=3)
    assert times == steady and len(attempts) == 3
    assert attempts[0]["p80"] / attempts[0]["p20"] > kb.UNSTEADY >= attempts[2]["p80"] / attempts[2]["p20"]
    script = iter([bimodal, noisy])
    times, attempts = kb.time_steady(lambda: next(script), reruns=1)
    assert times == noisy and len(attempts) == 2  # none steady: the least unsteady, after 1 + reruns tries
    times, attempts = kb.time_steady(lambda: steady, reruns=2)
    assert len(attempts) == 1
    assert "attempts" not in kb.record("x", times, None, None, attempts=attempts)


def test_layer_rows_on_cpu(tmp_path):
    """--layer: the memory layer and the whole model, forward+backward, on the PyTorch path
    (no CUDA here), with the memory layers' estimated share of the model's time."""
    from tools.bench_kernels import main

    out = tmp_path / "layer.json"
    assert (
        main(
            [
                "--layer",
                "configs/tiny.yaml",
                "--layer-batch",
                "1",
                "--layer-seq",
                "8",
                "--repeats",
                "1",
                "--dtype",
                "fp32",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = {r["name"]: r for r in json.loads(out.read_text())["layer"]}
    kinds = {f"kind_{k}_fwd_bwd_torch" for k in ("attention", "ffn", "memory", "output_head")}
    parts = {f"memory_part_{p}_fwd_bwd_torch" for p in ("scoring", "bag")} | {"memory_part_rest_torch"}
    models = {"model_fwd_bwd_torch", "model_fwd_bwd_torch_compiled"}
    assert set(rows) == {"memory_layer_fwd_bwd_torch", "kind_unattributed_torch"} | models | kinds | parts
    # one memory layer's parts (scoring, bag) and its rest add up to the layer
    layer = rows["memory_layer_fwd_bwd_torch"]
    assert sum(rows[n]["p50"] for n in parts) == pytest.approx(layer["p50"])
    assert sum(rows[n]["share_of_layer"] for n in parts) == pytest.approx(1.0)
    assert rows["memory_part_scoring_fwd_bwd_torch"]["k_dim"] == load_config("configs/tiny.yaml").model.memory.k_dim
    model = rows["model_fwd_bwd_torch"]
    assert model["memory_layers"] == 1 and model["batch"] == 1 and model["seq"] == 8
    assert model["memory_share_estimate"] == rows["memory_layer_fwd_bwd_torch"]["p50"] / model["p50"]
    # where the time goes: the config's sublayer counts; the kinds and the rest add up to the model
    cfg = load_config("configs/tiny.yaml").model
    counts = {name: rows[name]["count"] for name in kinds}
    assert counts == {
        "kind_attention_fwd_bwd_torch": cfg.n_layers,
        "kind_ffn_fwd_bwd_torch": cfg.n_layers - 1,
        "kind_memory_fwd_bwd_torch": 1,
        "kind_output_head_fwd_bwd_torch": 1,
    }
    for name in kinds:
        assert rows[name]["total_ms"] == pytest.approx(rows[name]["count"] * rows[name]["p50"])
    assert sum(rows[n]["total_ms"] for n in kinds | {"kind_unattributed_torch"}) == pytest.approx(model["p50"])
    assert sum(rows[n]["share"] for n in kinds | {"kind_unattributed_torch"}) == pytest.approx(1.0)
    # the model compiled as train.compile compiles it: the same gradients as eager, timed beside it
    # (fp32 here; in bf16 inductor rounds once where eager rounds after every op, and a rounded
    # query can change a top-k slot: the GPU row's difference is a few percent)
    compiled = rows["model_fwd_bwd_torch_compiled"]
    assert compiled["grad_max_rel_diff"] < 1e-5
    assert compiled["compile_speedup"] == pytest.approx(model["p50"] / compiled["p50"])


def test_layer_needs_a_memory_config(tmp_path):
    from tools.bench_kernels import main

    with pytest.raises(SystemExit, match="model.memory.layers is empty"):
        main(["--layer", "configs/tiny_dense.yaml", "--layer-batch", "1", "--layer-seq", "8", "--repeats", "1"])
    with pytest.raises(SystemExit):
        main(["--layer", str(tmp_path / "missing.yaml")])


def test_chunk_sizes_are_set_for_the_rows_timed_inside_and_restored():
    """--row-chunks / --key-chunks time the hot-row paths at other chunk sizes: the constant is
    the kernels' own (read at call time), set inside and restored after, also on an error."""
    from kernels import bag_triton
    from pretrain.bench.memory_kernels import module_constant
    from tools.bench_kernels import parse_args

    before = bag_triton.ROW_CHUNK
    with module_constant(bag_triton, "ROW_CHUNK", 7):
        assert bag_triton.ROW_CHUNK == 7
    with pytest.raises(RuntimeError), module_constant(bag_triton, "ROW_CHUNK", 3):
        raise RuntimeError("a failing row")
    assert bag_triton.ROW_CHUNK == before
    assert parse_args(["--row-chunks", "256", "64", "--key-chunks", "512"]).row_chunks == [256, 64]
    with pytest.raises(SystemExit):
        parse_args(["--row-chunks", "0"])


def test_json_records_the_raw_timings_date_and_commit(tmp_path, monkeypatch):
    """Every derived number recomputes from the raw per-call times the JSON stores (numpy's
    percentiles, the bytes and FLOPs counted by hand), and the run names its date and commit."""
    import datetime
    import subprocess

    import numpy as np

    from tools.bench_kernels import main

    monkeypatch.delenv("MEMLAYERS_COMMIT", raising=False)
    out = tmp_path / "bench.json"
    T, H, k, n, k_dim, d = 16, 2, 4, 16, 16, 24
    argv = ["--tokens", T, "--heads", H, "--k", k, "--n-keys", n, "--k-dim", k_dim, "--v-dims", d]
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    assert main([str(a) for a in [*argv, "--repeats", 4, "--dtype", "fp32", "--json", out]]) == 0
    payload = json.loads(out.read_text())
    date = datetime.datetime.strptime(payload["date"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
    assert before <= date <= datetime.datetime.now(datetime.timezone.utc)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert payload["commit"].removesuffix("-dirty") == head
    assert payload["device"] == "cpu" and payload["torch"]
    rows = {r["name"]: r for r in payload["results"]}
    for r in rows.values():
        assert len(r["times_ms"]) == 4
        for p in (20, 50, 80):
            assert r[f"p{p}"] == pytest.approx(np.percentile(r["times_ms"], p), rel=1e-12)
    scoring = rows["scoring_fwd_torch"]
    by_hand = T * H * k_dim * 4 + H * n * k_dim * 4 + T * H * k * (4 + 8)  # query, both half-key sets, weights+ids
    assert scoring["bytes"] == by_hand
    p50_s = np.percentile(scoring["times_ms"], 50) / 1e3
    assert scoring["gb_s"] == pytest.approx(by_hand / p50_s / 1e9, rel=1e-12)
    assert scoring["tflop_s"] == pytest.approx(2 * T * H * n * k_dim / p50_s / 1e12, rel=1e-12)
    # the backward reads what the forward did and writes the query's and the keys' gradients
    grads = T * H * k_dim * 4 + H * n * k_dim * 4
    assert rows["scoring_fwd_bwd_torch"]["bytes"] == by_hand + (by_hand + grads)
    shape = kb.Shape(T, H, k, n, k_dim, d, torch.float32)
    assert kb.scoring_bytes(shape, backward=True) == by_hand + grads
    gather, base = rows["bag_fwd_torch_gather_sum"], rows["bag_fwd_torch_embedding_bag"]
    ratio = np.percentile(base["times_ms"], 50) / np.percentile(gather["times_ms"], 50)
    assert gather["speedup"] == pytest.approx(ratio, rel=1e-12)

    monkeypatch.setenv("MEMLAYERS_COMMIT", "abc1234")  # gpu_check.sh's COMMIT, over a stale .git
    assert main([str(a) for a in [*argv, "--repeats", 1, "--json", out]]) == 0
    assert json.loads(out.read_text())["commit"] == "abc1234"


def test_sweep_json_keeps_each_side_s_raw_timings(tmp_path):
    import numpy as np

    rows = kb.sweep_scoring(4, 1, 2, 8, [8, 16], torch.device("cpu"), 3)
    for r in rows:
        assert len(r["product_key_times_ms"]) == len(r["brute_force_times_ms"]) == 3
        pk, bf = np.median(r["product_key_times_ms"]), np.median(r["brute_force_times_ms"])
        assert r["brute_over_product"] == pytest.approx(bf / pk, rel=1e-12)
        assert r["product_key_us_per_token"] == pytest.approx(1e3 * pk / r["tokens"], rel=1e-12)


@pytest.mark.parametrize(
    ("tool", "argv", "named"),
    [
        ("bench_kernels", ["--json", "{tmp}"], "bench_kernels.json"),
        ("bench_kernels", ["--sweep", "--plot", "{tmp}"], "sweep.png"),
        ("bench_kernels", ["--v-dims", "0"], "--v-dims"),
        ("bench_kernels", ["--sweep-tokens", "0"], "--sweep-tokens"),
        ("bench_objective", ["--json", "{tmp}"], "bench_objective.json"),
        ("bench_objective", ["--repeats", "0"], "--repeats"),
        ("bench_attention", ["--json", "{tmp}"], "bench_attention.json"),
        ("bench_attention", ["--doc-lengths", "8,x"], "comma-separated numbers"),
        ("bench_attention", ["--doc-lengths", "0"], ">= 1"),
        ("bench_attention", ["--heads", "3", "--kv-heads", "2"], "must divide --heads 3"),
        ("bench_attention", ["--repeats", "0"], "--repeats"),
    ],
)
def test_bad_options_are_refused_when_parsed(tool, argv, named, tmp_path, monkeypatch, capsys):
    """Refused with the option and the fix named, before any tensor is made: a folder as --json
    failed only at the final rename after the whole run (IsADirectoryError), --repeats 0 in
    torch.quantile, a bad --doc-lengths or --kv-heads mid-run as tracebacks."""
    import importlib

    module = importlib.import_module(f"tools.{tool}")

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the options were checked")

    monkeypatch.setattr(torch, "randn", no_work)
    monkeypatch.setattr(kb, "make_inputs", no_work)
    with pytest.raises(SystemExit) as exit_:
        module.main([a.format(tmp=tmp_path) for a in argv])
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


def test_one_file_for_the_sweep_json_and_its_plot_is_refused_at_the_parse(tmp_path, capsys):
    """--sweep --json s.png --plot s.png ran the sweep, saved the plot, then wrote the JSON over it.
    Without --sweep no plot is written: the same name is then nobody's clash. And bench_values'
    JSON, named after its --plot with .json, cannot take the plot's name: a .json plot is refused."""
    from tools.bench_kernels import parse_args
    from tools.bench_values import parse_args as bench_values_args

    both = str(tmp_path / "s.png")
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--sweep", "--json", both, "--plot", both])
    assert exit_.value.code == 2
    assert (
        f"--json and --plot both name {both}: the one written last would replace the other" in capsys.readouterr().err
    )
    assert parse_args(["--json", both, "--plot", both]).json == both
    with pytest.raises(SystemExit):
        bench_values_args(["--plot", str(tmp_path / "x.json")])
    assert "matplotlib cannot write a .json image" in capsys.readouterr().err


SMALL = ["--tokens", "16", "--n-keys", "16", "--k", "4", "--k-dim", "16", "--repeats", "1", "--dtype", "fp32"]


def test_the_progress_bar_counts_the_scoring_once_and_each_value_dim(capsys):
    """The scoring rows run once (at the first value dim), the bag rows once per value dim: with
    two value dims the bar ends at 3 of 3 (it stopped at 3 of 4, as if the scoring ran twice)."""
    from tools.bench_kernels import main

    assert main([*SMALL, "--v-dims", "8", "24"]) == 0
    bars = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "kernels:" in line]
    assert bars and "3/3" in bars[-1] and "100%" in bars[-1]


def test_a_run_cut_short_keeps_the_rows_measured_in_its_json(tmp_path, monkeypatch):
    """gpu_check stops a stage at its time limit: the JSON is rewritten after every row (marked
    incomplete), so the rows measured before the stop come back; a finished run says complete."""
    import pretrain.bench.memory_kernels as memory_kernels
    import tools.bench_kernels as bench

    out = tmp_path / "bench.json"

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # the stage's timeout, in the middle of the bag backward rows

    monkeypatch.setattr(memory_kernels, "_bag_backward_rows", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.main([*SMALL, "--v-dims", "24", "--json", str(out)])
    payload = json.loads(out.read_text())
    assert payload["complete"] is False and {"device", "date", "commit", "settings"} <= payload.keys()
    names = {r["name"] for r in payload["results"]}
    assert {"scoring_fwd_torch", "scoring_fwd_bwd_torch", "bag_fwd_torch_embedding_bag"} <= names
    assert not any(n.startswith("bag_bwd") for n in names)
    monkeypatch.undo()
    assert bench.main([*SMALL, "--v-dims", "24", "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["complete"] is True and any(r["name"].startswith("bag_bwd") for r in payload["results"])


def test_a_layer_run_cut_short_keeps_the_rows_measured_in_its_json(tmp_path, monkeypatch):
    """--layer saves each row as it is measured too: stopped in the whole-model rows, the memory
    layer's rows (the layer ratio on a GPU) are in the JSON."""
    import pretrain.bench.layer as layer
    import tools.bench_kernels as bench

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(layer, "model_rows", stopped)
    out = tmp_path / "layer.json"
    argv = ["--layer", "configs/tiny.yaml", "--layer-batch", "1", "--layer-seq", "8", "--repeats", "1"]
    with pytest.raises(KeyboardInterrupt):
        bench.main([*argv, "--dtype", "fp32", "--json", str(out)])
    payload = json.loads(out.read_text())
    names = {r["name"] for r in payload["layer"]}
    assert payload["complete"] is False and "memory_layer_fwd_bwd_torch" in names
    assert {"memory_part_scoring_fwd_bwd_torch", "memory_part_rest_torch"} <= names
