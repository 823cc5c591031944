"""tools/plot_lr_schedule.py: the summary names where warm-up and decay fall; the PNG is written."""

from __future__ import annotations

import pytest
from PIL import Image

from tools.plot_lr_schedule import main


def test_plot_and_summary(tmp_path, capsys):
    out = tmp_path / "schedule.png"
    overrides = ["train.max_steps=400", "optim.warmup_steps=40", "optim.decay_fraction=0.25", "optim.decay_shape=sqrt"]
    assert main(["--config", "configs/tiny.yaml", *overrides, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warm-up over steps 0..39" in printed and "sqrt decay over steps 300..399 to lr x 0.1" in printed
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300
    assert [p.name for p in tmp_path.iterdir()] == ["schedule.png"]  # no temporary left


def test_bad_setting_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "configs/tiny.yaml", "optim.decay_fraction=2", "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2 and "optim.decay_fraction=2.0 must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
