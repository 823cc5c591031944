"""The main job's entry point (`make demo`), shortened: it trains, then reports where things are."""

from __future__ import annotations

from pathlib import Path

from pretrain import demo
from tests.train.helpers import TINY


def test_shortened_demo_end_to_end(tmp_path, data_cache, capsys):
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    (run_dir / "stale-file").write_text("a previous demo run")  # replaced, not resumed
    code = demo.main(
        [
            "--config",
            "configs/tiny.yaml",
            *TINY,
            f"train.run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
            "train.max_steps=12",
            "train.eval_every=12",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "=== demo finished ===" in out
    first, last = (float(x.split()[0]) for x in out.split("train loss: ")[1].split(" -> "))
    assert last < first
    for label in ("validation loss", "fact recall", "checkpoint:", "slot table:", "TensorBoard:"):
        assert label in out
    table = Path(out.split("slot table:")[1].split()[0])
    assert table.is_file() and table.parent.parent.parent == run_dir
    assert not (run_dir / "stale-file").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_demo_reports_config_errors(capsys):
    assert demo.main(["--config", "configs/tiny.yaml", "train.max_step=3"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err
