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


def test_the_evaluation_says_which_rows_its_losses_cover():
    """val_loss is over the first train.eval_batches x train.micro_batch rows of each split, and
    memlayers-perplexity's over the whole split: a walk read 5.516 in the training log against 5.602 from
    the tool, with nothing in the log saying they cover other rows. A start-up line now says it."""
    from pretrain.evaluate import Evaluator

    def source(name, val, train=1000):
        splits = {"train": {"sequences": train}, **({"val": {"sequences": val}} if val else {})}
        return SimpleNamespace(name=name, has_validation=bool(val), manifest={"splits": splits})

    cfg = SimpleNamespace(train=SimpleNamespace(eval_batches=8, micro_batch=8))
    one = Evaluator(cfg, [source("english", 406)], None, None, "cpu")
    assert one.scope_line() == (
        "eval: val_loss over the first 64 of 406 val sequences of english (train.eval_batches x "
        "train.micro_batch = 8 x 8 rows; memlayers-perplexity scores a whole split)"
    )
    mixture = Evaluator(
        cfg, [source("pydocs", 81), source("licenses", 40)], None, None, "cpu", heldout=[source("web", None, 500)]
    )
    assert mixture.scope_line().startswith(
        "eval: val_loss/pydocs over the first 64 of 81 val sequences of pydocs, val_loss/licenses over all 40 val "
        "sequences of licenses, heldout_loss/web over the first 64 of 500 train sequences of web ("
    )
