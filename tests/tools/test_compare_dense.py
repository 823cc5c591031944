"""tools/compare_dense.py: the command line reaches the runs as written (seeds, then overrides),
mistakes are named before the first run, and --json is written whole, its folder created."""

from __future__ import annotations

import json
from pathlib import Path

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
    """The table's note said "(1 seeds; ...)" after a run with one seed, and each cell '5.0000 +- 0.0000',
    a spread of 0 where none is known."""
    assert compare_dense.main(["--seeds", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "(1 seed; same tokens per seed for both models)"
    assert "| memory | 5.0000 | 0.5000 | 0.0500 |" in out and "+-" not in "".join(out)


def test_run_dir_keeps_each_run_in_its_own_folder(runs, monkeypatch, tmp_path, capsys):
    """The runs went to a temporary folder deleted at the end: their TensorBoard curves and slot
    tables were lost, and compare_dense could not be pointed at a user's runs."""
    kept = []

    def writing_run(config, seed, run_dir, overrides):
        (run_dir / "tensorboard").mkdir(parents=True)
        kept.append(run_dir)
        return {"val_loss": 2.0, "fact_recall": 0.5, "fact_recall_chance": 0.05}

    monkeypatch.setattr(compare_dense, "run_one", writing_run)
    assert compare_dense.main(["--seeds", "0", "1", "--run-dir", str(tmp_path / "cmp")]) == 0
    expected = [tmp_path / "cmp" / name / f"seed={seed}" for seed in (0, 1) for name in ("memory", "dense")]
    assert kept == expected and all((d / "tensorboard").is_dir() for d in expected)
    assert f"tensorboard --logdir {tmp_path / 'cmp'}" in capsys.readouterr().out


def finished_run(tmp_path, overrides, step, evals, trained_in=None):
    """A run folder as the trainer leaves it at `step`: config.yaml, checkpoints/latest naming
    step_<step>, and eval/* scalars in its TensorBoard events ({step: {metric: value}})."""
    from torch.utils.tensorboard import SummaryWriter

    from pretrain.checkpoint.layout import tag_for
    from pretrain.config import load_config
    from pretrain.config.saving import save_config

    run_dir = tmp_path / "cmp" / "memory" / "seed=0"
    cfg = load_config("configs/tiny.yaml", ["train.seed=0", f"train.run_dir={trained_in or run_dir}", *overrides])
    (run_dir / "checkpoints" / tag_for(step)).mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text(tag_for(step))
    save_config(cfg, run_dir / "config.yaml")
    writer = SummaryWriter(str(run_dir / "tensorboard"))
    for at, metrics in evals.items():
        for name, value in metrics.items():
            writer.add_scalar(f"eval/{name}", value, at)
    writer.close()
    return run_dir


def test_a_finished_run_is_read_back_not_trained(tmp_path, monkeypatch):
    """Resuming a finished run trains and evaluates nothing (its result has no evaluation): the
    final step's evaluation comes from its TensorBoard events, not an earlier one."""
    import pretrain.train

    monkeypatch.setattr(pretrain.train, "train", lambda cfg: pytest.fail("a finished run was trained again"))
    overrides = ["train.max_steps=6", "train.eval_every=3"]
    final = {"val_loss": 1.25, "fact_recall": 0.375, "fact_recall_chance": 0.0625}
    run_dir = finished_run(tmp_path, overrides, 6, {3: {"val_loss": 9.0, "fact_recall": 0.0}, 6: final})
    assert compare_dense.run_one("configs/tiny.yaml", 0, run_dir, overrides) == final


def test_a_finished_run_of_another_config_is_refused(tmp_path):
    run_dir = finished_run(tmp_path, ["train.max_steps=6", "optim.lr=1e-3"], 6, {6: {"val_loss": 1.0}})
    with pytest.raises(SystemExit) as refused:
        compare_dense.run_one("configs/tiny.yaml", 0, run_dir, ["train.max_steps=6"])
    assert "differs in optim.lr" in str(refused.value) and "--run-dir" in str(refused.value)


def test_a_finished_run_moved_into_the_layout_is_read(tmp_path, monkeypatch):
    """Runs trained by hand elsewhere (runs/man/mem/seed=0), moved or linked into --run-dir's layout:
    their saved train.run_dir differs, nothing they trained does."""
    import pretrain.train

    monkeypatch.setattr(pretrain.train, "train", lambda cfg: pytest.fail("a finished run was trained again"))
    run_dir = finished_run(tmp_path, ["train.max_steps=6"], 6, {6: {"val_loss": 1.5}}, trained_in="runs/man/mem/seed=0")
    assert compare_dense.run_one("configs/tiny.yaml", 0, run_dir, ["train.max_steps=6"]) == {"val_loss": 1.5}


def test_the_per_seed_difference_is_printed_beside_the_spreads(monkeypatch, tmp_path, capsys):
    """Both models of a seed read the same tokens, so the seed moves both: on /usr/share/man pages
    (3 seeds, 300 steps) memory 5.0967 +- 0.1509 against dense 5.1203 +- 0.1289 hid that memory was
    lower by 0.055 and 0.021 on two seeds and higher by 0.006 on the third."""
    val = {("memory", 0): 4.9273, ("dense", 0): 4.9827, ("memory", 1): 5.2170, ("dense", 1): 5.2382}
    val |= {("memory", 2): 5.1459, ("dense", 2): 5.1401}

    def measured(config, seed, run_dir, overrides):
        return {"val_loss": val["dense" if "dense" in config else "memory", seed]}

    monkeypatch.setattr(compare_dense, "run_one", measured)
    assert compare_dense.main(["--seeds", "0", "1", "2", "--json", str(tmp_path / "c.json")]) == 0
    differences = [4.9273 - 4.9827, 5.2170 - 5.2382, 5.1459 - 5.1401]
    mean, sd = sum(differences) / 3, (sum((d - sum(differences) / 3) ** 2 for d in differences) / 2) ** 0.5
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| memory - dense")]
    assert row == [f"| memory - dense, per seed | {mean:.4f} +- {sd:.4f} | n/a | n/a |"]
    written = json.loads((tmp_path / "c.json").read_text())["memory_minus_dense"]
    assert written == {"val_loss": pytest.approx(differences)}


def test_a_finished_run_of_a_submitted_sweep_is_read(tmp_path, monkeypatch):
    """memlayers-submit --sweep train.seed=0,1,2 with train.run_dir=DIR/memory makes DIR/memory/seed=0, ...,
    compare_dense's layout, and saves the config's paths absolute: data.cache_dir=/abs/.cache/data
    against this command's relative .cache/data read as another config."""
    import pretrain.train

    monkeypatch.setattr(pretrain.train, "train", lambda cfg: pytest.fail("a finished run was trained again"))
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the repository: configs/ and the relative default
    submitted = [f"data.cache_dir={Path.cwd() / '.cache' / 'data'}", "train.max_steps=6"]
    run_dir = finished_run(tmp_path, submitted, 6, {6: {"val_loss": 1.75}})
    assert compare_dense.run_one("configs/tiny.yaml", 0, run_dir, ["train.max_steps=6"]) == {"val_loss": 1.75}
