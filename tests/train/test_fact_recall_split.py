"""Fact recall on 2 ranks: the probes are split across the ranks, each asked once, and the recall
every rank reports is the one a single process asking them all computes; a rank with fewer
forwards still runs as many as the others (its model's collectives must pair up)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pretrain.evaluate import ProbeBatch, fact_recall
from pretrain.spawn import run_gloo

VOCAB, LENGTH, PROBES, MICRO = 11, 5, 5, 2


class Rule(torch.nn.Module):
    """Predicts token (3 t + 1) mod VOCAB after token t; records the rows it is asked."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[int]] = []
        self.forwards = 0

    def forward(self, tokens):
        self.forwards += 1
        self.rows += [row for row in tokens.tolist() if any(row)]
        return torch.nn.functional.one_hot((3 * tokens + 1) % VOCAB, VOCAB).float()


def _probes() -> ProbeBatch:
    """PROBES probes; those with an even index are answered by `Rule`, the others (one answer
    token changed) are not: recall 3/5."""
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(1, VOCAB, (PROBES, LENGTH), generator=gen)
    targets = (3 * tokens + 1) % VOCAB
    mask = torch.zeros(PROBES, LENGTH, dtype=torch.bool)
    mask[:, 2:] = True
    targets[1::2, 3] = (targets[1::2, 3] + 1) % VOCAB
    return ProbeBatch(tokens, mask, targets, torch.full((PROBES,), 0.25, dtype=torch.float64))


def _brute_force(batch: ProbeBatch) -> float:
    answered = [
        all(
            batch.targets[p, i] == (3 * batch.tokens[p, i] + 1) % VOCAB
            for i in range(LENGTH)
            if batch.answer_mask[p, i]
        )
        for p in range(PROBES)
    ]
    return sum(answered) / PROBES


def _rank(rank: int, world: int, out: str) -> None:
    model = Rule()
    result = fact_recall(model, _probes(), torch.device("cpu"), micro_batch=MICRO, rank=rank, world_size=world)
    record = {**result, "rows": model.rows, "forwards": model.forwards}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def test_world2_asks_each_probe_once_and_reports_the_world1_recall(tmp_path):
    """5 probes in forwards of 2 at world 2: rank 0 asks the first 2 (one forward), rank 1 the last
    3 (two forwards); rank 0 runs one empty forward more so that both run two. Both report 3/5,
    the brute-force recall and world 1's. Before, every rank asked all 5."""
    batch = _probes()
    assert _brute_force(batch) == 3 / 5
    alone = Rule()
    assert fact_recall(alone, batch, torch.device("cpu"), micro_batch=MICRO)["fact_recall"] == 3 / 5
    run_gloo(_rank, 2, str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [len(r["rows"]) for r in ranks] == [2, 3]
    assert ranks[0]["rows"] + ranks[1]["rows"] == batch.tokens.tolist()  # contiguous parts, in order
    assert [r["forwards"] for r in ranks] == [2, 2]
    assert [r["fact_recall"] for r in ranks] == [3 / 5, 3 / 5]
    assert [r["fact_recall_chance"] for r in ranks] == [0.25, 0.25]
