"""pretrain/words.py: a count with its noun in the right number, and the messages that use it."""

from __future__ import annotations

from pretrain.words import counted


def test_one_is_singular_and_every_other_count_plural():
    assert [counted(n, "rank") for n in (0, 1, 2, 11)] == ["0 ranks", "1 rank", "2 ranks", "11 ranks"]
    assert counted(1, "CUDA device") == "1 CUDA device" and counted(3, "child", "children") == "3 children"


def test_prepare_data_s_summary_of_a_one_shard_split():
    """prepare_data's last line said "val: 1 documents, ... 1 sequences, 1 shards" for a small split."""
    from tools.prepare_data import _summary

    manifest = {
        "splits": {
            "train": {"documents": 12, "tokens": 3000, "sequences": 20, "shards": ["a.tar", "b.tar"]},
            "val": {"documents": 1, "tokens": 1, "sequences": 1, "shards": ["c.tar"]},
        },
        "stats": {},
    }
    assert _summary("out", manifest) == (
        "out: train: 12 documents, 3000 tokens, 20 sequences, 2 shards; "
        "val: 1 document, 1 token, 1 sequence, 1 shard; stats {}"
    )
