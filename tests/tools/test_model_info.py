"""tools/model_info.py: the printed counts are the model's, for tiny and paper-scale configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pretrain.config import load_config
from pretrain.model import Transformer, count_parameters, flops_per_token
from tools import model_info


def run_json(capsys, argv):
    assert model_info.main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_json_counts_match_a_model_built_for_real(repo_root, capsys):
    path = repo_root / "configs/tiny.yaml"
    info = run_json(capsys, ["--config", str(path)])
    cfg = load_config(path).model
    torch.manual_seed(0)
    model = Transformer(cfg)  # a real CPU build, not the meta one the tool uses
    counts = count_parameters(model)
    assert info["parameters"] == {
        "dense": counts.dense,
        "memory_values": counts.memory_values,
        "memory_keys": counts.memory_keys,
        "memory_other": counts.memory_other,
        "active": counts.active,
        "total": counts.total,
    }
    assert info["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert info["seq_len"] == 128
    assert info["flops_per_token"] == flops_per_token(cfg, 128)


def test_overrides_and_seq_len(repo_root, capsys):
    info = run_json(
        capsys, ["--config", str(repo_root / "configs/tiny.yaml"), "model.memory.layers=[]", "--seq-len", "64"]
    )
    p = info["parameters"]
    assert p["memory_values"] == p["memory_keys"] == p["memory_other"] == 0 and p["active"] == p["total"]
    assert info["seq_len"] == 64 and info["flops_per_token"]["memory"] == 0


def test_table_for_a_paper_config(repo_root, capsys):
    assert model_info.main(["--config", str(repo_root / "configs/memory_373m.yaml")]) == 0
    out = capsys.readouterr().out
    assert "memory_values    1,073,741,824" in out  # 1024**2 slots x 1024
    assert "memory in layers [4, 12, 20]: 1,048,576 slots, k=32" in out
    for row in ("dense", "memory_keys", "memory_other", "active", "total"):
        assert f"  {row} " in out
    assert "seq_len 2048" in out


def test_bad_key_exits_with_the_suggestion(repo_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        model_info.main(["--config", str(repo_root / "configs/tiny.yaml"), "model.memory.n_key=3"])
    assert exit_info.value.code == 2
    assert "did you mean 'model.memory.n_keys'" in capsys.readouterr().err


def test_runs_as_a_script(repo_root):
    result = subprocess.run(
        [sys.executable, "tools/model_info.py", "--config", "configs/smf_1p3b.yaml", "--json"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    info = json.loads(result.stdout)
    assert info["parameters"]["memory_keys"] == 2 * 4 * 1024 * 256  # one layer, 4 heads, 2 x 1024 half-keys


def test_a_refused_config_and_help_come_before_torch_is_imported(repo_root):
    """The tool imported torch (and the model) at its top: `--help` and a mistyped key waited for it
    (medians 5.6 and 2.4 s on the loaded 2-core machine; 0.3 and 0.2 s now). torch is now imported where the
    model is built; the reference is sys.modules of a fresh interpreter after the refusal (and after --help)."""
    script = (
        "import sys\n"
        "from tools.model_info import main\n"
        "for argv in (['--help'], ['--config', 'configs/tiny.yaml', 'model.memory.n_key=3']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        print('exit', e.code)\n"
        "print(sorted(m for m in ('torch', 'triton', 'deepspeed') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines()[-3:] == ["exit 0", "exit 2", "[]"], done.stdout + done.stderr
    assert "did you mean 'model.memory.n_keys'" in done.stderr, done.stderr


def test_memory_estimate_takes_the_options_and_overrides(repo_root, capsys):
    from pretrain.model.memory_budget import GiB, estimate_memory

    path = repo_root / "configs/smf_1p3b.yaml"
    argv = ["--config", str(path), "train.activation_checkpointing=full", "--world-size", "8", "--micro-batch", "2"]
    info = run_json(capsys, argv + ["--gpu-memory", "40"])
    m = info["memory_per_gpu"]
    cfg = load_config(path, ["train.activation_checkpointing=full"])
    estimate = estimate_memory(cfg, 8, 2)
    assert m["total"] == estimate.total and m["dense"] == estimate.dense and m["activations"] == estimate.activations
    assert (m["world_size"], m["micro_batch"], m["zero_stage"], m["activation_checkpointing"]) == (8, 2, 2, "full")
    assert m["fits"] == (estimate.total <= 40 * GiB)
    best = m["largest_micro_batch"]
    assert estimate_memory(cfg, 8, best).total <= 40 * GiB < estimate_memory(cfg, 8, best + 1).total


def test_a_run_too_large_for_the_gpu_is_said_not_to_fit(repo_root, capsys):
    assert model_info.main(["--config", str(repo_root / "configs/memory_373m.yaml"), "--gpu-memory", "8"]) == 0
    out = capsys.readouterr().out
    assert "does not fit in 8 GiB" in out and "not even micro-batch 1 fits" in out
    assert "not counted: the CUDA context" in out
