"""Texts agreed between ranks (pretrain/distributed.py: text_from, rank0_text, share_refusal) on 2 gloo
ranks: every rank ends with the sending rank's exact text, whatever its characters or length."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.spawn import run_gloo

TEXTS = ["", "plain", "naïve – 日本語 ✓\nsecond line\x00after a NUL", "x" * 100_000]


def _texts(rank: int, world: int, out_dir: str) -> None:
    from pretrain.distributed import rank0_text, share_refusal, text_from
    from pretrain.model.config import ConfigError

    seen = {
        "from_rank_1": [text_from(1, text if rank == 1 else f"rank {rank}'s own") for text in TEXTS],
        "rank0": rank0_text("rank 0 says ü" if rank == 0 else ""),
    }
    try:
        share_refusal(ConfigError("bad key 'ü'\non two lines") if rank == 1 else None, (ConfigError,))
    except ConfigError as err:
        seen["refusal"] = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))


def test_every_rank_gets_the_sending_rank_s_exact_text(tmp_path):
    run_gloo(_texts, 2, str(tmp_path))
    import socket

    host = socket.gethostname()
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["from_rank_1"] == TEXTS
        assert seen["rank0"] == "rank 0 says ü"
        # rank 1 raises its own error; rank 0 the same kind, naming rank 1, its host and its message
        expected = "bad key 'ü'\non two lines" if rank == 1 else f"rank 1 on {host}: bad key 'ü'\non two lines"
        assert seen["refusal"] == expected


def test_the_ranks_with_a_problem_are_named_as_the_rendezvous_names_them():
    from pretrain.distributed import RankProblem

    assert RankProblem((3,), 8, "m").who() == "rank 3"
    assert RankProblem((1, 3), 8, "m").who() == "ranks 1, 3 (2 of 8)"
    assert RankProblem(tuple(range(1, 11)), 16, "m").who() == "ranks 1, 2, 3, 4, 5, 6, 7, 8, ... (10 of 16)"
