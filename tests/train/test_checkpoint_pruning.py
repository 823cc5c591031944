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


def test_a_folder_moved_aside_is_not_counted_or_deleted(tmp_path):
    """A damaged checkpoint moved aside beside the others, as the resume's refusal advises
    (`step_00000010.damaged`), neither takes one of the `keep` places nor is deleted; steps past
    the 8 padded digits order by number."""
    real = [9, 10, 11]
    for step in real:
        (tmp_path / tag_for(step)).mkdir()
    aside = tmp_path / (tag_for(10) + ".damaged")
    aside.mkdir()
    prune_checkpoints(tmp_path, 2, tag_for(11))
    assert aside.is_dir()  # was counted as a checkpoint, then deleted two saves later
    assert folders_named(tmp_path) == [tag_for(10), tag_for(11)]  # was only step 11
    for step in (99_999_999, 100_000_000):  # "step_100000000" < "step_99999999" as text
        (tmp_path / tag_for(step)).mkdir()
    prune_checkpoints(tmp_path, 2, tag_for(100_000_000))
    assert folders_named(tmp_path) == [tag_for(99_999_999), tag_for(100_000_000)]
    assert aside.is_dir()


def folders_named(root: Path) -> list[str]:
    """The checkpoint folders left, by name, in step order (independent of step_of)."""
    names = [p.name for p in root.iterdir() if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    return sorted(names, key=lambda name: int(name.removeprefix("step_")))


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
