"""tools/bench_slots.py, bench_data.py, bench_parallel.py --json: the raw times (every step, every
loader round) with the device, date, commit and torch version (kernels.benchmark.write_results, as
bench_kernels writes them), and the summary numbers they print recomputed here from those raw
times. Before, these three printed their summaries only."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def check_run_info(payload: dict, device: str = "cpu") -> None:
    assert payload["device"] == device and payload["torch"] == torch.__version__
    assert payload["commit"] and payload["commit"] != "unknown"
    assert payload["date"].endswith("Z") and len(payload["date"]) == len("2026-12-06T19:45:53Z")


def test_bench_slots_json_holds_every_step_time(tmp_path, capsys, cpu_ops_built):
    from tools.bench_slots import main

    out = tmp_path / "slots.json"
    argv = ["--steps", "3", "--warmup", "0", "--n-keys", "0", "--device", "cpu", "--no-optimizer"]
    assert main([*argv, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    check_run_info(payload)
    assert payload["settings"]["steps"] == "3" and payload["settings"]["no_optimizer"] == "True"
    (row,) = payload["rows"]
    off, on, sorted_pairs = row["off_step_s"], row["on_step_s"], row["sorted_step_s"]  # sorted: CPU, document
    assert len(off) == len(on) == len(sorted_pairs) == 3 and all(t > 0 for t in off + on + sorted_pairs)
    assert len(row["on_update_cpu_s"]) == len(row["sorted_update_cpu_s"]) == 3  # the counting's CPU time per step
    for stat, fn in (("median", statistics.median), ("min", min)):
        assert row[stat] == {
            "off_s": fn(off),
            "on_s": fn(on),
            "ratio": fn(on) / fn(off),
            "sorted_s": fn(sorted_pairs),
            "sorted_ratio": fn(sorted_pairs) / fn(off),
            "on_vs_sorted": fn(on) / fn(sorted_pairs),
        }
        line = f"{row['slots']}\t{stat}\t{fn(off) * 1e3:.1f}\t{fn(on) * 1e3:.1f}\t{fn(on) / fn(off):.3f}x"
        line += f"\t{fn(sorted_pairs) * 1e3:.1f}\t{fn(sorted_pairs) / fn(off):.3f}x\t{fn(on) / fn(sorted_pairs):.3f}x"
        assert line in printed
    walk, sort = (statistics.median(row[f"{k}_update_cpu_s"]) for k in ("on", "sorted"))
    assert f"update, compiled walk / sorted pairs (medians): {walk / sort:.3f}x" in printed


def test_bench_data_json_holds_the_raw_measurements(tmp_path, capsys):
    from tools.bench_data import main

    out = tmp_path / "data.json"
    argv = ["--entities", "30", "--seconds", "0.1", "--train-steps", "2", "--micro-batch", "2", "--seq-len", "16"]
    argv += ["--files", "12"]
    rc = main([*argv, "--json", str(out)])
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    check_run_info(payload)
    raw, summary = payload["raw"], payload["summary"]
    rounds = [raw["loader_plain"], raw["loader_shuffled"], *raw["single_rounds"], *raw["mixture_rounds"]]
    rounds.append(raw["loader_row_split_4_readers"])
    assert len(raw["single_rounds"]) == len(raw["mixture_rounds"]) == 4 and len(raw["train_step_s"]) == 2
    assert all(r["tokens"] > 0 and r["tokens"] % (2 * 16) == 0 and r["seconds"] > 0 for r in rounds)
    per_s = [r["tokens"] / r["seconds"] for r in rounds]
    train = 2 * raw["train_tokens_per_step"] / sum(raw["train_step_s"])
    loader = min(per_s[0], per_s[1])
    expected = {
        "encode_tokens_per_s": raw["corpus_tokens"] / raw["encode_s"],
        "prepare_tokens_per_s": raw["corpus_tokens"] / raw["prepare_s"],
        "folder_files_per_s": 12 / raw["folder_prepare"]["seconds"],
        "loader_plain_tokens_per_s": per_s[0],
        "loader_shuffled_tokens_per_s": per_s[1],
        "single_median_tokens_per_s": statistics.median(per_s[2:6]),
        "mixture_median_tokens_per_s": statistics.median(per_s[6:10]),
        "loader_row_split_4_readers_tokens_per_s": per_s[10],
        "train_tokens_per_s": train,
        "loader_tokens_per_s": loader,
        "loader_over_training": loader / train,
        "passed": loader / train >= 20 and loader >= 5e6,
    }
    assert summary == pytest.approx(expected, rel=1e-12)
    assert rc == (0 if expected["passed"] else 1)
    assert f"loader / training: {loader / train:.0f}x" in printed
    assert f"{raw['corpus_tokens']} tokens" in printed
    assert raw["folder_prepare"]["files"] == 12 and raw["folder_prepare"]["tokens"] > 12
    assert "prepare_data on a folder of 12 one-document files" in printed


def test_bench_data_times_the_loader_on_a_users_prepared_datasets(tmp_path, capsys):
    """bench_data read only the embedded corpus it builds: a user could not time the loader on their own
    data (timed by hand through `loader_round`). --data takes prepared folders (the first is the single
    dataset, all of them the mixture), --config-data those of a config; the rounds read their seq_len
    (24 here, where --seq-len's default is 128). The reference: each folder's manifest."""
    import yaml

    from pretrain.data.prepare import prepare_corpus
    from tools.bench_data import main

    corpus = tmp_path / "corpus.txt"
    words = ["memory", "layer", "slot", "token", "shard", "loader", "rank", "step"]
    corpus.write_text("\n\n".join(" ".join(words[(d * 7 + i) % 8] for i in range(60)) for d in range(200)))
    mine, other = tmp_path / "mine", tmp_path / "other"
    prepare_corpus([corpus], mine, 24, vocab_size=300, fmt="blocks", val_fraction=0.1, show_progress=False)
    prepare_corpus(
        [corpus],
        other,
        24,
        tokenizer_path=mine / "tokenizer.model",
        fmt="blocks",
        val_fraction=0.1,
        show_progress=False,
    )
    sequences = [json.loads((d / "manifest.json").read_text())["splits"]["train"]["sequences"] for d in (mine, other)]
    argv = ["--entities", "30", "--seconds", "0.1", "--train-steps", "1", "--micro-batch", "2", "--files", "2"]

    out = tmp_path / "data.json"
    main([*argv, "--data", str(mine), str(other), "--json", str(out)])
    printed = capsys.readouterr().out
    raw = json.loads(out.read_text())["raw"]
    assert raw["loader_datasets"] == [str(mine), str(other)] and raw["train_tokens_per_step"] == 2 * 24
    assert (
        f"loader datasets (seq_len 24): {mine} ({sequences[0]:,} training sequences, weight 1), "
        f"{other} ({sequences[1]:,} training sequences, weight 1)"
    ) in printed
    assert "mixture (2 sources, 1:1)" in printed and "batch 2x24" in printed
    rounds = [raw["loader_plain"], raw["loader_shuffled"], raw["loader_row_split_4_readers"], *raw["mixture_rounds"]]
    assert len(raw["mixture_rounds"]) == 4 and all(r["tokens"] > 0 and r["tokens"] % (2 * 24) == 0 for r in rounds)

    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["data"] = {"dir": str(mine)}
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(config))
    main([*argv, "--config", str(tmp_path / "mine.yaml"), "--config-data", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text())["raw"]["loader_datasets"] == [str(mine)]
    assert f"loader datasets (seq_len 24): {mine} ({sequences[0]:,} training sequences" in printed
    assert "single dataset vs mixture: not measured (one dataset given)" in printed

    with pytest.raises(SystemExit) as exit_:  # the embedded corpus's config: no dataset to time
        main([*argv, "--config-data"])
    assert exit_.value.code == 2 and "names no prepared dataset" in capsys.readouterr().err


def test_bench_parallel_json_holds_every_ranks_step_times(tmp_path, monkeypatch, capsys):
    """The spawned ranks (minutes of DeepSpeed start-up on a shared CPU) stand in for records made as
    the worker makes them (`step_timing` of its step times, the warm-up step first)."""
    import tools.bench_parallel as tool
    from pretrain.bench.parallel import step_timing

    times = {
        (2, 1): [[0.9, 0.3, 0.5, 0.4], [0.8, 0.31, 0.52, 0.41]],
        (2, 2): [[0.7, 0.2, 0.25, 0.6], [1.0, 0.2, 0.2, 0.6]],
    }

    def run_bench(spec, configs):
        assert spec.steps == 3 and configs == list(times)
        records = []
        for (world, P), ranks in times.items():
            for rank, steps in enumerate(ranks):
                records.append(
                    {
                        "rank": rank,
                        "world_size": world,
                        "parallel_size": P,
                        **step_timing(steps),
                        "value_shard_bytes": 1 << 20,
                        "optimizer_state_bytes": 2 << 20,
                        "value_table_bytes_full": 1 << 20,
                        "comm_bytes_last_step": 4096,
                        "comm_bytes_last_step_estimate": 4096,
                        "peak_rss_bytes": 1 << 30,
                    }
                )
        return records

    monkeypatch.setattr(tool, "run_bench", run_bench)
    out = tmp_path / "parallel.json"
    tool.main(["--configs", "2:1,2:2", "--steps", "3", "--json", str(out)])
    printed = capsys.readouterr().out
    payload = json.loads(out.read_text())
    check_run_info(payload)
    assert payload["settings"]["configs"] == str(list(times))
    medians = {}
    for r in payload["records"]:
        steps = times[(r["world_size"], r["parallel_size"])][r["rank"]]
        assert r["step_times_s"] == steps[1:] and r["warmup_step_s"] == steps[0]
        assert r["step_time_median_s"] == statistics.median(r["step_times_s"])
        if r["rank"] == 0:
            medians[(r["world_size"], r["parallel_size"])] = statistics.median(r["step_times_s"])
    base = medians[(2, 1)]
    assert payload["relative"] == [
        {"world_size": w, "parallel_size": p, "relative": t / base} for (w, p), t in medians.items()
    ]
    assert f"W=2 P=2: {medians[(2, 2)] / base:.2f}x" in printed


def test_bench_cpu_paths_json_holds_every_call_time(tmp_path, capsys, cpu_ops_built):
    """tools/bench_cpu_paths.py: both formulations' CPU times per round, their medians as printed,
    the formulation kernels.ops picks; a malformed shape is refused when parsed, naming the form."""
    from tools.bench_cpu_paths import main

    out = tmp_path / "cpu_paths.json"
    argv = ["--shapes", "12:2:8:3:8", "64:2:64:2:8", "--rotary-shape", "2:5:3:8", "--rounds", "3"]
    assert main([*argv, "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    check_run_info(payload)
    rows = payload["rows"]
    assert [(r["part"], r["shape"], r.get("used")) for r in rows] == [
        ("scoring_backward", "12:2:8:3:8", "dense"),
        ("scoring_backward", "64:2:64:2:8", "sparse"),
        ("row_topk", "12:2:8:3", None),
        ("rotary", "2:5:3:8", None),
    ]
    compared = ({"sparse", "dense"},) * 2 + ({"1_thread", "2_threads"}, {"written_out", "complex"})
    assert rows[2]["time"] == "wall"
    for row, names in zip(rows, compared):
        assert set(row["times_s"]) == names and all(len(t) == 3 for t in row["times_s"].values())
        for name, times in row["times_s"].items():
            assert row["median_ms"][name] == pytest.approx(statistics.median(times) * 1e3)
    with pytest.raises(SystemExit):
        main(["--shapes", "12:2:8"])
    assert "expected T:H:n_keys:k:k_dim" in capsys.readouterr().err
