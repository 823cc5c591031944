"""A shard that disappears, is cut short or is replaced between preparing a dataset and training on
it (a scratch filesystem's purge, a copy cut short or redone) is named at start-up, before anything
is built or written; it used to be met only when the loader reached it, maybe hours into the run."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from pretrain.data.errors import DataError
from pretrain.train import train
from tests.train.helpers import tiny_config


@pytest.fixture
def dataset(data_cache, tmp_path):
    """A copy of the tiny embedded dataset, and its last training shard."""
    copy = tmp_path / "data"
    shutil.copytree(next(data_cache.glob("embedded-*")), copy)
    return copy, sorted((copy / "train").glob("shard-*.tar"))[-1]


def test_a_missing_shard_is_named_before_training(dataset, data_cache, tmp_path):
    data, missing = dataset
    missing.unlink()
    run = tmp_path / "run"
    with pytest.raises(
        DataError, match=rf"1 shard file\(s\) .* changed since it was prepared: {missing} is missing\. "
    ):
        train(tiny_config(run, data_cache, f"data.dir={data}", "train.max_steps=2"))
    assert not run.exists()  # refused before the run directory was made


def test_under_skip_a_missing_shard_is_a_warning(dataset, data_cache, tmp_path, capsys):
    data, missing = dataset
    missing.unlink()
    result = train(
        tiny_config(tmp_path / "run", data_cache, f"data.dir={data}", "train.max_steps=1", "data.on_corrupt=skip")
    )
    assert result.step == 1
    out = capsys.readouterr().out
    assert "warning: 1 shard file(s) that the dataset's manifest.json lists are missing or changed" in out
    assert f"{missing} is missing" in out


@pytest.mark.parametrize("change", ["cut short", "replaced by a smaller one"])
def test_a_shard_cut_short_or_replaced_is_named_before_training(dataset, data_cache, tmp_path, change):
    """A 2-step run trained on without a word over a dataset whose last shard was cut to half (it
    would have failed when the loader reached that shard); the sizes the manifest records are now
    compared at start-up, a stat per shard. (A shard replaced by one of the same size, as a dataset's
    full shards are, is still found by the loader, by its sha256.)"""
    data, last = dataset
    size = last.stat().st_size
    if change == "cut short":
        os.truncate(last, size // 2)
    else:  # a validation shard (fewer rows) copied over it
        shutil.copyfile(data / "val" / "shard-000000.tar", last)
    now = last.stat().st_size
    assert now != size
    run = tmp_path / "run"
    with pytest.raises(DataError, match=rf"{last} holds {now} bytes, not the {size} it was written with\. "):
        train(tiny_config(run, data_cache, f"data.dir={data}", "train.max_steps=2"))
    assert not run.exists()


def test_a_manifest_without_sizes_still_finds_an_empty_shard(dataset, data_cache, tmp_path):
    """Datasets prepared before the manifest recorded sizes: a shard smaller than its rows' tokens."""
    data, last = dataset
    manifest = json.loads((data / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            del shard["bytes"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    from pretrain.data.checks import shard_problems
    from pretrain.data.sources import resolve_sources

    cfg = tiny_config(tmp_path / "run", data_cache, f"data.dir={data}")
    assert shard_problems(resolve_sources(cfg.data, cfg.data.seq_len)) == []
    os.truncate(last, 0)  # a copy that made the file and wrote nothing (its filesystem full)
    with pytest.raises(DataError, match=rf"{last} holds 0 bytes, fewer than its \d+ sequences take"):
        train(tiny_config(tmp_path / "run", data_cache, f"data.dir={data}", "train.max_steps=2"))
