"""A shard that disappears between preparing a dataset and training on it (a scratch filesystem's
purge, a copy cut short) is named at start-up, before anything is built or written; it used to
be met only when the loader reached it, maybe hours into the run."""

from __future__ import annotations

import shutil

import pytest

from pretrain.data.errors import DataError
from pretrain.train import train
from tests.train.helpers import tiny_config


@pytest.fixture
def dataset(data_cache, tmp_path):
    """A copy of the tiny embedded dataset without its last training shard."""
    copy = tmp_path / "data"
    shutil.copytree(next(data_cache.glob("embedded-*")), copy)
    last = sorted((copy / "train").glob("shard-*.tar"))[-1]
    last.unlink()
    return copy, last


def test_a_missing_shard_is_named_before_training(dataset, data_cache, tmp_path):
    data, missing = dataset
    run = tmp_path / "run"
    with pytest.raises(DataError, match=rf"1 shard file\(s\) .* are missing: {missing}\. .*data.on_corrupt=skip"):
        train(tiny_config(run, data_cache, f"data.dir={data}", "train.max_steps=2"))
    assert not run.exists()  # refused before the run directory was made


def test_under_skip_a_missing_shard_is_a_warning(dataset, data_cache, tmp_path, capsys):
    data, missing = dataset
    result = train(
        tiny_config(tmp_path / "run", data_cache, f"data.dir={data}", "train.max_steps=1", "data.on_corrupt=skip")
    )
    assert result.step == 1
    assert (
        f"warning: 1 shard file(s) that the dataset's manifest.json lists are missing: {missing}"
        in capsys.readouterr().out
    )
