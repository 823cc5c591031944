"""train.init_from (pretrain/init_from.py): a new run starts from an export's weights.

The reference is the export itself: a run started from it with learning rate 0 and exported
again must give back every tensor bit for bit, on one rank and on two ranks that split the
value pool by columns (memory parallel 2, ZeRO 3)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pretrain.config import ConfigError
from pretrain.export import export_checkpoint
from pretrain.train import train
from tests.train.helpers import run_ranks, tiny_config

FROZEN = ("optim.lr=0", "optim.value_lr=0", "train.max_steps=2")  # the weights cannot move


@pytest.fixture(scope="module")
def exported(tmp_path_factory, data_cache) -> Path:
    """A tiny model trained 6 steps, exported in fp32."""
    root = tmp_path_factory.mktemp("init_from")
    train(tiny_config(root / "source", data_cache, "train.max_steps=6", "optim.lr=1e-2"))
    return export_checkpoint(root / "source", root / "export", show_progress=False)


def assert_same_weights(a: Path, b: Path) -> None:
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert first[name].equal(second[name]), name


def test_a_run_starts_from_the_export(exported, tmp_path, data_cache, capsys):
    fresh = train(tiny_config(tmp_path / "fresh", data_cache, "train.max_steps=1"))
    run = tmp_path / "run"
    started = train(tiny_config(run, data_cache, *FROZEN, f"train.init_from={exported}"))
    assert "initialised from" in capsys.readouterr().out
    assert_same_weights(exported, export_checkpoint(run, tmp_path / "again", show_progress=False))
    assert started.first_loss < fresh.first_loss - 0.3  # it starts where the source run ended, not at random
    # A run with a checkpoint resumes from it; the export is not read again (even if it is gone).
    moved = tmp_path / "moved"
    shutil.move(exported, moved)
    try:
        resumed = train(tiny_config(run, data_cache, *FROZEN[:2], "train.max_steps=3", f"train.init_from={exported}"))
        assert resumed.step == 3
        assert (
            "train.init_from is not read: the run resumes from its checkpoint step_00000002" in capsys.readouterr().out
        )
    finally:
        shutil.move(moved, exported)


def test_a_longer_context_starts_from_the_export(exported, tmp_path, data_cache, capsys):
    """Context extension: max_seq_len and rope_theta may differ (no weight depends on them)."""
    import json

    import torch

    from pretrain.export.loading import load

    run = tmp_path / "long"
    longer = ("model.max_seq_len=64", "data.seq_len=64", "model.rope_theta=50000")
    train(tiny_config(run, data_cache, *FROZEN, *longer, f"train.init_from={exported}"))
    assert "context changed: model.max_seq_len 32 -> 64, model.rope_theta 10000.0 -> 50000.0" in capsys.readouterr().out
    again = export_checkpoint(run, tmp_path / "again", show_progress=False)
    assert_same_weights(exported, again)
    assert json.loads((again / "config.json").read_text())["model"]["max_seq_len"] == 64
    # With rope_theta kept, the extended model computes what the export did on its context
    same_theta = tmp_path / "same_theta"
    train(tiny_config(same_theta, data_cache, *FROZEN, *longer[:2], f"train.init_from={exported}"))
    short, extended = load(exported), load(export_checkpoint(same_theta, tmp_path / "e2", show_progress=False))
    tokens = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(short(tokens), extended(tokens))
        assert extended(torch.randint(0, 384, (1, 64))).shape[1] == 64  # beyond the export's max_seq_len


def _world2(rank: int, root: str, cache: str, export: str) -> None:
    from pretrain.train import train

    overrides = (*FROZEN, "train.zero_stage=3", "model.memory.parallel_size=2", f"train.init_from={export}")
    train(tiny_config(Path(root) / "run", Path(cache), *overrides))


def test_two_ranks_each_load_their_value_columns(exported, tmp_path, data_cache):
    run_ranks(2, _world2, (str(tmp_path), str(data_cache), str(exported)), tmp_path / "results")
    assert_same_weights(exported, export_checkpoint(tmp_path / "run", tmp_path / "again", show_progress=False))


@pytest.mark.parametrize(
    "change,override,message",
    [
        ("none", "model.n_heads=4", "holds another model (model.n_heads: export 2 vs config 4)"),
        ("tokenizer", "", "was trained with another tokenizer than the data in"),
        ("no_weights", "", "has no model.safetensors: name a folder written by memlayers-export"),
        ("truncated", "", "model.safetensors"),
        # the run directory itself: said 'has no config.json', without the export command
        ("run_dir", "", "is a training run or checkpoint, not an export: export it first, memlayers-export"),
    ],
)
def test_a_mismatched_export_is_refused_before_anything_is_written(
    exported, tmp_path, data_cache, change, override, message
):
    source = tmp_path / "export"
    shutil.copytree(exported, source)
    if change == "tokenizer":  # another tokenizer file (only its bytes are compared)
        data = (source / "tokenizer.model").read_bytes()
        (source / "tokenizer.model").write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif change == "no_weights":
        (source / "model.safetensors").unlink()
    elif change == "run_dir":
        shutil.rmtree(source)
        (source / "checkpoints").mkdir(parents=True)
    elif change == "truncated":
        weights = source / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    run = tmp_path / "run"
    overrides = [f"train.init_from={source}", *([override] if override else [])]
    with pytest.raises(ConfigError) as err:
        train(tiny_config(run, data_cache, *overrides))
    assert message in str(err.value) and f"train.init_from={source}" in str(err.value)
    assert not run.exists()
