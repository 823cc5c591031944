"""tools/compare_dense.py: the command line reaches the runs as written (seeds, then overrides),
mistakes are named before the first run, and --json is written whole, its folder created."""

from __future__ import annotations

import json

import pytest

from tools import compare_dense


@pytest.fixture
def runs(monkeypatch):
    """run_one stubbed: records (config, seed, overrides) instead of training."""
    calls = []

    def fake_run(config, seed, run_dir, overrides):
        calls.append((config, seed, list(overrides)))
        return {"val_loss": 2.0 + seed, "fact_recall": 0.5, "fact_recall_chance": 0.05}

    monkeypatch.setattr(compare_dense, "run_one", fake_run)
    return calls


def test_overrides_after_the_seeds_reach_both_models(runs, tmp_path, capsys):
    """The docstring's own example: `--seeds 0 1 2 train.max_steps=1000` (argparse gave the
    override to --seeds and stopped with 'invalid int value')."""
    out = tmp_path / "new" / "compare.json"  # a folder that does not exist yet
    argv = ["--config", "configs/tiny.yaml", "--dense-config", "configs/tiny_dense.yaml", "--seeds", "0", "1"]
    assert compare_dense.main([*argv, "train.max_steps=1000", "--json", str(out)]) == 0
    assert runs == [
        (config, seed, ["train.max_steps=1000"])
        for seed in (0, 1)
        for config in ("configs/tiny.yaml", "configs/tiny_dense.yaml")
    ]
    written = json.loads(out.read_text())
    assert written["seeds"] == [0, 1] and [r["val_loss"] for r in written["results"]["memory"]] == [2.0, 3.0]
    assert [p.name for p in out.parent.iterdir()] == ["compare.json"]  # no temporary left
    assert "2.5000 +- 0.7071" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0", "x"], "seeds must be integers"),
        (["--seeds", "train.max_steps=5"], "at least one integer seed"),
        (["--dense-config", "configs/missing.yaml"], "configs/missing.yaml does not exist"),
        (["train.max_steps=-1"], "train.max_steps"),
        # a traceback from numpy's seeding after the data and model were built
        (["--seeds", "-1"], "--seeds -1: train.seed=-1 must be >= 0"),
        (["--seeds", "0", "-2"], "--seeds -2: train.seed=-2 must be >= 0"),  # only the first seed was checked
    ],
)
def test_mistakes_are_named_before_any_run(runs, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        compare_dense.main([*argv, "--json", str(tmp_path / "c.json")])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert runs == [] and not (tmp_path / "c.json").exists()


def test_json_naming_a_folder_is_refused_before_any_run(runs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        compare_dense.main(["--seeds", "0", "--json", str(tmp_path)])
    assert "is a folder" in capsys.readouterr().err and runs == []


def test_one_seed_is_named_in_the_singular(runs, capsys):
    """The table's note said "(1 seeds; ...)" after a run with one seed."""
    assert compare_dense.main(["--seeds", "3"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "(1 seed; same tokens per seed for both models)"
