"""pretrain.evaluate.load_seen_probes: the probes a run's fact recall asks are the first
train.probe_limit trained-fact probes of the first source holding probes; new facts never."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from pretrain.data.synthetic import Probe, write_probes
from pretrain.evaluate import load_seen_probes


class CharTokenizer:
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return [1 + ord(c) % 97 for c in text]


class Lines:
    def __init__(self):
        self.lines: list[str] = []

    def line(self, text: str) -> None:
        self.lines.append(text)


def _source(name, folder, probes=True, validation=True):
    return SimpleNamespace(name=name, dir=folder, has_probes=probes, has_validation=validation)


def test_the_first_trained_probes_of_the_first_source_with_probes(tmp_path):
    probes = [
        Probe(f"Q: Where was P{i} born? A:", f"C{i}", "city", 1 / (i + 2), is_new_fact=i % 3 == 0) for i in range(8)
    ]
    (tmp_path / "b").mkdir()
    write_probes(probes, tmp_path / "b" / "probes.jsonl")
    cfg = SimpleNamespace(train=SimpleNamespace(probe_limit=3), data=SimpleNamespace(seq_len=64))
    sources = [_source("a", tmp_path / "a", probes=False), _source("b", tmp_path / "b", validation=False)]
    metrics = Lines()
    batch = load_seen_probes(cfg, sources, CharTokenizer(), metrics)
    trained = [p for p in probes if not p.is_new_fact][:3]  # probes 1, 2, 4
    assert batch.chance.tolist() == [p.chance for p in trained]
    tokenizer = CharTokenizer()
    for row, probe in zip(batch.tokens.tolist(), trained):
        question = [tokenizer.eos_id] + tokenizer.encode(probe.question)
        assert row[: len(question)] == question
    assert batch.answer_mask.any(dim=1).all() and batch.tokens.dtype == torch.long
    assert metrics.lines == [f"data: source b ({tmp_path / 'b'}) has no validation sequences: not evaluated"]


def test_no_source_with_probes_says_fact_recall_is_not_evaluated(tmp_path):
    cfg = SimpleNamespace(train=SimpleNamespace(probe_limit=3), data=SimpleNamespace(seq_len=64))
    metrics = Lines()
    assert load_seen_probes(cfg, [_source("a", tmp_path, probes=False)], CharTokenizer(), metrics) is None
    assert metrics.lines == ["data: no probes.jsonl in the data: fact recall is not evaluated (validation loss is)"]
