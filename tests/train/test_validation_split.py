"""Validation on 2 ranks: the rows are split across the ranks, each read once, and the loss is the
one world 1 reports; ranks with fewer batches still join the collectives of the others' forwards
(memory parallelism P = 2, ZeRO 3)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.train.helpers import run_ranks, tiny_config

# micro-batches of 1 row, 3 of them: world 2 splits the 3 rows 1 + 2, so rank 0 has one batch
# fewer than rank 1 (and one forward to join with an empty batch)
SPLIT = ["train.micro_batch=1", "train.global_batch=2", "train.eval_batches=3", "train.max_steps=1"]
SPLIT += ["train.eval_every=1"]
RUNS = {"zero1": ["train.zero_stage=1"], "p2_zero3": ["train.zero_stage=3", "model.memory.parallel_size=2"]}


def _evaluate(run_dir: Path, cache: Path, overrides: list[str]) -> dict:
    """Train one step and evaluate; the loss and the validation rows this rank read, in order."""
    from pretrain.train import train
    from tests.train.helpers import fixed_batches

    rows = []

    def counting(cfg, dataset, split, *args, **kwargs):
        loader = fixed_batches(cfg, dataset, split, *args, **kwargs)
        if split == "train":
            return loader

        def read():
            for batch in loader:
                for r in range(batch.tokens.shape[0]):  # the stored row: inputs + last target
                    row = batch.tokens[r].tolist() + batch.targets[r, -1:].tolist()
                    rows.append([int(batch.doc_ids[r, 0]), *row])
                yield batch

        return read()

    result = train(tiny_config(run_dir, cache, *SPLIT, *overrides), loaders=counting)
    return {"val_loss": result.eval["val_loss"], "fact_recall": result.eval["fact_recall"], "rows": rows}


def _suite(rank: int, root: str, cache: str) -> dict:
    return {name: _evaluate(Path(root) / name, Path(cache), extra) for name, extra in RUNS.items()}


@pytest.fixture(scope="module")
def world2(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("val-split")
    return run_ranks(2, _suite, (str(root), str(data_cache)), root / "results")


@pytest.mark.parametrize("run", RUNS)
def test_world2_reads_each_validation_row_once_and_reports_the_world1_loss(world2, run, tmp_path, data_cache):
    """Every row world 1 reads is read by exactly one of the 2 ranks (rank 0 the first part, rank 1
    the rest, 1 and 2 rows), and the loss all ranks report equals world 1's within float rounding
    (the weights after one step differ by that; the same tolerance as the training losses'). Before,
    every rank read all 3 rows."""
    reference = _evaluate(tmp_path / "w1", data_cache, [])
    assert len(reference["rows"]) == 3 and len({tuple(r) for r in reference["rows"]}) == 3
    ranks = [result[run] for result in world2]
    assert [len(r["rows"]) for r in ranks] == [1, 2]
    assert ranks[0]["rows"] + ranks[1]["rows"] == reference["rows"]  # contiguous parts, in order
    read = Counter(tuple(row) for r in ranks for row in r["rows"])
    assert read == Counter(tuple(row) for row in reference["rows"])  # each row once over the ranks
    assert ranks[0]["val_loss"] == ranks[1]["val_loss"]
    assert ranks[0]["val_loss"] == pytest.approx(reference["val_loss"], rel=1e-5, abs=0)
    # the probes are split across the ranks too (tests/train/test_fact_recall_split.py); the
    # recall all ranks report is world 1's, and the memory group's forwards pair up
    assert ranks[0]["fact_recall"] == ranks[1]["fact_recall"] == reference["fact_recall"]
