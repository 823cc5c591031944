"""A data loader that fails on one rank in the middle of training otherwise than with a DataError (a
worker killed by the kernel's out-of-memory killer, a shard its node cannot read) stops every rank
within seconds, naming it. The failing rank raised a RuntimeError alone, and the others waited for it
in the step's all-reduce until the hang watchdog fired (measured: rank 0 still waiting when the test
harness gave up, 37 s after rank 1 had left). Ranks as in test_one_rank_faults.py."""

from __future__ import annotations

import time
from pathlib import Path

from tests.train.helpers import run_ranks_outcome, tiny_config


def _worker_killed_on_rank_1(rank: int, run: str, cache: str) -> dict:
    """Rank 1's loader worker is killed (SIGKILL, as the OOM killer does) before step 3."""
    import multiprocessing
    import os
    import signal

    from pretrain import train as train_module

    real = train_module.Trainer.next_batch

    def killing(self, batches):
        if rank == 1 and self.state.step == 2 and not getattr(self, "killed", False):
            self.killed = time.time()
            for child in multiprocessing.active_children():  # the DataLoader's worker
                os.kill(child.pid, signal.SIGKILL)
            time.sleep(1)  # dead before the next batch is asked for (not reaped: the DataLoader finds it so)
        return real(self, batches)

    train_module.Trainer.next_batch = killing
    try:
        train_module.train(tiny_config(Path(run), Path(cache), "train.max_steps=6", "data.num_workers=1"))
        return {"error": None}
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err), "raised_at": time.time()}


def test_a_loader_worker_killed_on_one_rank_stops_every_rank_naming_it(tmp_path, data_cache):
    ranks = run_ranks_outcome(2, _worker_killed_on_rank_1, (str(tmp_path / "run"), str(data_cache)), tmp_path, 120)
    for rank, outcome in enumerate(ranks):
        assert outcome is not None, f"rank {rank} still waits after 120 s (a collective its peer never joined)"
        assert "result" in outcome, f"rank {rank}: {outcome['error']}: {outcome['message']}\n{outcome['traceback']}"
    got = [r["result"] for r in ranks]
    refusal = (
        r"the training data loader failed at step 3: DataLoader worker \(pid \d+\) is killed by signal: Killed\.; "
        r"most often the kernel's out-of-memory killer \(dmesg\)"
    )
    import re

    assert got[0]["error"] == got[1]["error"] == "DataError"
    assert re.match(refusal, got[1]["message"]), got[1]["message"]
    assert re.match(rf"rank 1 on \S+: {refusal}", got[0]["message"]), got[0]["message"]
    assert abs(got[0]["raised_at"] - got[1]["raised_at"]) < 20
