"""run_gloo's ranks fork from a server that imported torch and DeepSpeed once: they must still
start with the caller's environment of the moment, and DeepSpeed's accelerator of the moment."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from pretrain import spawn
from pretrain.bench.parallel import _worker as real_bench_worker


def _environment(rank: int, world: int, out_dir: str) -> None:
    from deepspeed.accelerator import get_accelerator

    seen = {k: os.environ.get(k) for k in ("MEMLAYERS_SPAWN_PROBE", "MEMLAYERS_SPAWN_GONE", "RANK", "WORLD_SIZE")}
    seen["accelerator"] = get_accelerator().device_name()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))


def test_ranks_start_with_the_callers_environment_of_the_moment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMLAYERS_SPAWN_GONE", "set when the first ranks started")
    spawn.run_gloo(_environment, 1, str(tmp_path))  # the fork server runs from here on (if not before)
    monkeypatch.setenv("MEMLAYERS_SPAWN_PROBE", "set after the fork server started")
    monkeypatch.delenv("MEMLAYERS_SPAWN_GONE")
    spawn.run_gloo(_environment, 2, str(tmp_path))
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {
            "MEMLAYERS_SPAWN_PROBE": "set after the fork server started",
            "MEMLAYERS_SPAWN_GONE": None,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "accelerator": "cpu",
        }


def test_a_changed_accelerator_starts_fresh_interpreters(monkeypatch):
    """DeepSpeed fixes its accelerator when imported: the fork server's import is only reused
    under the DS_ACCELERATOR (and TRITON_INTERPRET) it was made under."""
    monkeypatch.setattr(spawn, "_server_env", [("cpu", None)])
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert spawn._start_method() == "forkserver"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert spawn._start_method() == "spawn"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert spawn._start_method() == "spawn"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("DS_ACCELERATOR")  # each rank sets cpu before importing DeepSpeed
    assert spawn._start_method() == "spawn"


def _one_rank_fails(rank: int, world: int, how: str) -> None:
    import signal

    import torch
    import torch.distributed as dist

    if rank == 1:
        if how in ("raise", "survivor-busy"):
            raise ValueError("rank one's own error: shapes (3, 4) and (4, 3)")
        os.kill(os.getpid(), signal.SIGKILL)
    if how == "survivor-busy":  # never meets the lost peer: ended by torch after the grace
        import time

        time.sleep(60)
    dist.all_reduce(torch.ones(2))  # the survivor meets the lost peer here


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("raise", "rank 1 of 2 failed: ValueError: rank one's own error: shapes (3, 4) and (4, 3)"),
        ("kill", "rank 1 of 2 was killed by SIGKILL (the out-of-memory killer, or a signal from outside)"),
        ("survivor-busy", "rank 1 of 2 failed: ValueError: rank one's own error: shapes (3, 4) and (4, 3)"),
    ],
)
def test_a_failed_rank_is_named_in_one_line_with_its_own_error(how, said, monkeypatch):
    """torch.multiprocessing reported the process it joined first, often the survivor with gloo's
    `Connection closed by peer` (29 lines), while rank 1's ValueError appeared nowhere. The reference
    is the error rank 1 was made to have. A survivor still busy after the grace is ended by torch,
    which logged it ("Terminating process N via signal SIGTERM") above the line."""
    monkeypatch.setattr(spawn, "SURVIVOR_GRACE_S", 0.5)
    torch_log, logged = logging.getLogger("torch.multiprocessing.spawn"), []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    torch_log.addHandler(handler)
    try:
        with pytest.raises(spawn.RankFailed) as raised:
            spawn.run_gloo(_one_rank_fails, 2, how)
    finally:
        torch_log.removeHandler(handler)
    assert str(raised.value) == said
    if how != "kill":  # its traceback rides along as a note, for tests and debugging
        assert "in _one_rank_fails" in raised.value.__notes__[0]
    assert logged == []


def test_a_report_cut_short_by_the_survivors_sigterm_is_passed_over(tmp_path):
    """A survivor still busy after the grace is ended by torch's SIGTERM, which can come while it
    writes its report: the file opened, nothing in it yet. The failed rank is still the one named,
    not a JSONDecodeError of the half-written report raised over it."""
    cause = {"error": "ValueError: rank 0's own", "lost_peer": False, "traceback": "tb", "at": 1.0}
    (tmp_path / "rank0.json").write_text(json.dumps(cause))
    (tmp_path / "rank1.json").write_text("")
    ended = [SimpleNamespace(exitcode=1), SimpleNamespace(exitcode=-signal.SIGTERM)]
    failure = spawn._failure(2, str(tmp_path), ended)
    assert str(failure) == "rank 0 of 2 failed: ValueError: rank 0's own"


def _bench_worker_rank_one_fails(rank: int, world: int, *args) -> None:
    if rank == 1:
        raise ValueError("rank one's own error in the benchmark")
    real_bench_worker(rank, world, *args)  # rank 0 meets the lost peer in DeepSpeed's start or a step


def test_bench_parallel_names_the_failed_rank_in_one_line(monkeypatch, capsys):
    import pretrain.bench.parallel as bench
    from tools import bench_parallel

    monkeypatch.setattr(bench, "_worker", _bench_worker_rank_one_fails)
    assert bench_parallel.main(["--n-keys", "32", "--steps", "1", "--configs", "2:1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: rank 1 of 2 failed: ValueError: rank one's own error in the benchmark"
    assert not any("Traceback" in line for line in err)
