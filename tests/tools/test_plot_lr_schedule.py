"""tools/plot_lr_schedule.py: the summary names where warm-up and decay fall; the PNG is written."""

from __future__ import annotations

import pytest
from PIL import Image

from pretrain.config import load_config
from pretrain.lr_schedule import learning_rates
from tools.plot_lr_schedule import main


def test_plot_and_summary(tmp_path, capsys):
    out = tmp_path / "schedule.png"
    overrides = ["train.max_steps=400", "optim.warmup_steps=40", "optim.decay_fraction=0.25", "optim.decay_shape=sqrt"]
    assert main(["--config", "configs/tiny.yaml", *overrides, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "warm-up over steps 1..40" in printed and "sqrt decay over steps 301..400 to lr x 0.1" in printed
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300
    assert [p.name for p in tmp_path.iterdir()] == ["schedule.png"]  # no temporary left


def test_steps_are_numbered_as_the_training_log_numbers_them(tmp_path, capsys):
    """The summary said "warm-up over steps 0..39, ... decay over steps 300..399" for a 400-step run
    whose log prints steps 1 to 400, and the resume refusal names them so too: the named warm-up
    ends on the log's first step at the peak rate, the named decay's first step is the last at the
    peak, and its last is step 400."""
    overrides = ["train.max_steps=400", "optim.warmup_steps=40", "optim.decay_fraction=0.25"]
    assert main(["--config", "configs/tiny.yaml", *overrides, "--out", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out
    cfg = load_config("configs/tiny.yaml", overrides)
    logged_lr = {step + 1: learning_rates(step, cfg)[0] for step in range(400)}  # the log's "step N/400 ... lr"
    peak = cfg.optim.lr
    assert logged_lr[39] < peak and logged_lr[40] == peak and "warm-up over steps 1..40 " in printed
    assert logged_lr[301] == peak and logged_lr[302] < peak and "cosine decay over steps 301..400 " in printed


def test_bad_setting_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "configs/tiny.yaml", "optim.decay_fraction=2", "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2 and "optim.decay_fraction=2.0 must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_out_without_suffix_is_a_png_and_a_folder_is_refused(tmp_path, capsys):
    """matplotlib read the format from the temporary's name, whose suffix is its random tail
    when --out has none ("Format 'tmp-...' is not supported"); a folder crashed in the rename."""
    out = tmp_path / "schedule"
    assert main(["--config", "configs/tiny.yaml", "train.max_steps=50", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--config", "configs/tiny.yaml", "train.max_steps=50", "--out", str(tmp_path / "s.pdf")]) == 0
    assert (tmp_path / "s.pdf").read_bytes()[:5] == b"%PDF-"
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "configs/tiny.yaml", "--out", str(tmp_path)])
    assert exit_.value.code == 2 and "is a folder: name the file to write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pdf", "schedule"]  # no temporary left


def test_a_suffix_matplotlib_cannot_write_is_refused_when_parsed(tmp_path, monkeypatch, capsys):
    """--out s.xyz crashed in the save with matplotlib's ValueError traceback, after the config
    was loaded and the schedule computed; it is refused at the parse, as inspect_data --plot is."""
    import tools.plot_lr_schedule as tool

    monkeypatch.setattr(tool, "load_config", lambda *a: pytest.fail("the config was loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "configs/tiny.yaml", "--out", str(tmp_path / "s.xyz")])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2 and f"argument --out: {tmp_path / 's.xyz'}: matplotlib cannot write a .xyz image" in err
    )
    assert list(tmp_path.iterdir()) == []


def test_no_warmup_is_not_described_as_one(tmp_path, capsys):
    """optim.warmup_steps=0 printed "warm-up over steps 0..0" (0-based then), a one-step warm-up that is not there."""
    assert main(["--config", "configs/tiny.yaml", "optim.warmup_steps=0", "--out", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out
    assert "no warm-up (lr 0.003 from step 1)" in printed and "warm-up over" not in printed


@pytest.mark.parametrize("warmup", [99, 100, 200])
def test_warmup_as_long_as_the_run_leaves_no_decay_and_may_not_reach_the_peak(tmp_path, capsys, warmup):
    """optim.warmup_steps >= train.max_steps printed "warm-up over steps 0..199 to lr 0.003" for a
    100-step run that ends at lr 0.0015, and "cosine decay over steps 100..99", a decay with no step."""
    overrides = ["train.max_steps=100", f"optim.warmup_steps={warmup}"]
    assert main(["--config", "configs/tiny.yaml", *overrides, "--out", str(tmp_path / "s.png")]) == 0
    printed = capsys.readouterr().out
    cfg = load_config("configs/tiny.yaml", overrides)
    lrs = [learning_rates(step, cfg)[0] for step in range(100)]
    assert "decay over" not in printed and "no cosine decay" in printed
    assert all(lr <= lrs[-1] for lr in lrs)  # no step decays; the last is the highest
    if warmup > 100:
        assert f"warm-up over all 100 steps, ending at lr {lrs[-1]:g}: the peak lr 0.003 is never reached" in printed
    else:
        assert f"warm-up over steps 1..{warmup} to lr 0.003" in printed and lrs[-1] == 0.003
