"""Which checkpoints a save keeps (train.keep_checkpoints), also after a roll-back: the newest
ones up to the checkpoint just written, which is always kept; later ones, from the run that was
rolled back, are left alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.checkpoint import latest_checkpoint, prune_checkpoints, tag_for
from pretrain.train import train
from tests.train.helpers import tiny_config


def folders(root: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("step_")) for p in root.glob("step_*"))


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_prune_keeps_the_newest_up_to_the_saved_step(tmp_path, keep):
    steps = [100, 200, 300, 400, 1200]  # 1200 sorts after 400 only as a padded tag
    for step in steps:
        (tmp_path / tag_for(step)).mkdir()
    (tmp_path / "latest").write_text(tag_for(300))  # rolled back to 300, then saved it again
    prune_checkpoints(tmp_path, keep, tag_for(300))
    up_to_saved = [s for s in steps if s <= 300]
    assert folders(tmp_path) == up_to_saved[-keep:] + [400, 1200]  # the later ones untouched


def test_a_rolled_back_run_never_deletes_the_checkpoint_it_just_wrote(tmp_path, data_cache):
    run = tmp_path / "run"
    train(tiny_config(run, data_cache, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=3"))
    root = run / "checkpoints"
    assert folders(root) == [2, 3, 4]
    (root / "latest").write_text(tag_for(2))  # roll back (e.g. to retry past a loss spike)
    opts = ("train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=1")
    result = train(tiny_config(run, data_cache, *opts))
    assert result.step == 3
    # step 3 is the resumed run's own (written again), step 4 the abandoned run's: both kept
    assert folders(root) == [3, 4] and latest_checkpoint(root).name == tag_for(3)
    assert train(tiny_config(run, data_cache, *opts)).step == 3  # it resumes from there
