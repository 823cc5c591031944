"""The export's model card (pretrain/export/card.py) names the data a run trained on."""

from __future__ import annotations

import hashlib
import types
from pathlib import Path

from pretrain.config.schema import DataConfig, RunConfig, SourceConfig
from pretrain.export.card import data_line
from pretrain.export.writer import data_manifests


def dataset(folder: Path, text: str) -> Path:
    folder.mkdir()
    (folder / "manifest.json").write_text(text)
    return folder


def test_a_mixture_run_s_card_names_every_source_with_its_weight_and_manifest(tmp_path):
    """A run on two sources drawn 3:1 (a fresh clone's git release notes and man pages) was exported with
    a card reading 'data manifest sha256: <the first source's>': the second corpus, a quarter of what
    the model read, was named nowhere. Each source is named now, with its share and its manifest's
    sha256 (the reference: hashlib over the files)."""
    relnotes = dataset(tmp_path / "relnotes", '{"seq_len": 128, "a": 1}')
    man = dataset(tmp_path / "man", '{"seq_len": 128, "b": 2}')
    cfg = RunConfig(
        data=DataConfig(sources=[SourceConfig(dir=str(relnotes), weight=3), SourceConfig(dir=str(man), name="pages")])
    )
    src = types.SimpleNamespace(cfg=cfg, dataset_dir=relnotes)  # the folder its tokenizer is read from
    sha = {p: hashlib.sha256((p / "manifest.json").read_bytes()).hexdigest() for p in (relnotes, man)}
    assert data_manifests(src) == [("relnotes", 3.0, sha[relnotes]), ("pages", 1.0, sha[man])]
    assert data_line(data_manifests(src)) == (
        "data: a mixture of 2 sources, sequences drawn by weight: "
        f"relnotes (weight 0.750, manifest sha256 `{sha[relnotes]}`); pages (weight 0.250, manifest sha256 `{sha[man]}`)"
    )

    one = types.SimpleNamespace(cfg=RunConfig(data=DataConfig(dir=str(man))), dataset_dir=man)
    assert data_line(data_manifests(one)) == f"data manifest sha256: `{sha[man]}`"  # one dataset: as before
