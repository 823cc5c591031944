"""An export killed by SIGKILL while it writes (tests/crash_launch.py: a real kill of tools/export.py's
process): the output folder is the old export whole, or absent, or the new one whole, never a
half-written or half-deleted folder; a rerun succeeds and leaves no temporary behind."""

from __future__ import annotations

import signal

import pytest

from pretrain.checkpoint import tag_for
from pretrain.export import export_checkpoint
from pretrain.train import train
from tests.crash_launch import start
from tests.train.helpers import file_hashes, tiny_config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, data_cache):
    run = tmp_path_factory.mktemp("export-crash") / "run"
    train(tiny_config(run, data_cache, "train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2"))
    return [run / "checkpoints" / tag_for(step) for step in (1, 2)]


def killed_export(point: str, source, out, log) -> None:
    child = start(point, 0, "export", [str(source), str(out), "--force"], log)
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, log.read_text()[-3000:]


@pytest.mark.parametrize("point", ["export-written", "export-replacing"])
def test_an_export_killed_mid_write_leaves_a_whole_folder_or_none(checkpoints, tmp_path, point):
    old_ckpt, new_ckpt = checkpoints
    new = file_hashes(export_checkpoint(new_ckpt, tmp_path / "reference", show_progress=False))
    out = export_checkpoint(old_ckpt, tmp_path / "export", show_progress=False)
    old = file_hashes(out)
    assert old != new
    killed_export(point, new_ckpt, out, tmp_path / "export.log")
    found = file_hashes(out) if out.exists() else None
    assert found in (old, new, None), f"{out} is half written: {sorted(found or {})}"
    if point == "export-written":
        assert found == old  # not renamed yet
    with pytest.warns(UserWarning, match="left by killed writers"):  # the killed export's temporary
        export_checkpoint(new_ckpt, out, force=True, show_progress=False)  # the rerun
    assert file_hashes(out) == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.log", "reference"]  # no temporary left
