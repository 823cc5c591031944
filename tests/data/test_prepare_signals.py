"""tools/prepare_data.py with tokenizer workers, signaled as Slurm signals a job step (every
process) or as the out-of-memory killer ends one worker. Measured before pretrain/data/worker_pool.py
(multiprocessing.Pool, --workers 2, this corpus): SIGTERM to the workers left the preparation
waiting forever for the chunks they held (the Pool replaced them silently), its temporary folder
beside --output; SIGTERM to every process ended it with exit status 143 and no word; USR1 (Slurm's
--signal warning) killed it at once, the temporary folder left behind."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _corpus(folder: Path) -> Path:
    """About 40 MB of JSON Lines: several seconds of tokenizing on 2 workers."""
    words = "alpha beta gamma delta memory layer slot value key token the of and a to".split()
    rng = random.Random(0)
    path = folder / "corpus.jsonl"
    with open(path, "w") as fh:
        for _ in range(60_000):
            fh.write(json.dumps({"text": " ".join(rng.choices(words, k=150))}) + "\n")
    return path


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def _serving_workers(parent: int, count: int, timeout: float = 120) -> list[int]:
    """The pids of `parent`'s children that ignore SIGTERM and USR1 (tokenizer workers past their
    start), once there are `count`; fails after `timeout` seconds."""
    stop_signals = (1 << (signal.SIGTERM - 1)) | (1 << (signal.SIGUSR1 - 1))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                status = _status(int(entry.name))
                if (
                    status.get("PPid") == str(parent)
                    and int(status.get("SigIgn", "0"), 16) & stop_signals == stop_signals
                ):
                    found.append(int(entry.name))
        if len(found) >= count:
            return found
        time.sleep(0.1)
    pytest.fail(f"no {count} tokenizer workers ignoring SIGTERM and USR1 after {timeout} s")


@pytest.fixture
def preparation(tmp_path, tokenizer):
    """Starts tools/prepare_data.py --workers 2 in a session of its own; yields (process, output)."""
    corpus = _corpus(tmp_path)
    out = tmp_path / "data"
    argv = [sys.executable, str(REPO / "tools" / "prepare_data.py"), "--input", str(corpus), "--output", str(out)]
    argv += ["--tokenizer", str(tokenizer.path), "--seq-len", "32", "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        yield proc, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def _left_beside(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith((out.name, f".{out.name}")))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_to_every_process_ends_the_preparation_with_one_message(preparation, stop):
    proc, out = preparation
    workers = _serving_workers(proc.pid, 2)
    for pid in [*workers, proc.pid]:  # as Slurm signals each process of the step
        os.kill(pid, stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + stop, err
    assert err.startswith(f"error: stopped by {signal.Signals(stop).name} ("), err
    assert f"the unfinished preparation was removed and {out} is as it was before" in err
    assert "Traceback" not in err, err
    assert _left_beside(out) == []  # neither the output nor a temporary
    assert not any(_status(pid) for pid in workers)  # ended by the main process, not left running


def test_a_worker_killed_by_the_out_of_memory_killer_is_named(preparation):
    proc, out = preparation
    victim = _serving_workers(proc.pid, 2)[0]
    os.kill(victim, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    assert err == (
        f"error: a tokenizer worker (pid {victim}) was killed by SIGKILL, most often the kernel's out-of-memory "
        "killer (dmesg): use fewer --workers\n"
    )
    assert _left_beside(out) == []


def test_a_worker_that_dies_idle_after_the_last_result_loses_nothing():
    """Once every result is in, the pool told each worker to end by writing to its pipe: one that had
    died while idle (the out-of-memory killer, say) failed the whole map after its last result with a
    BrokenPipeError. It owed nothing: the map now ends as without it, no process left behind."""
    import multiprocessing

    from pretrain.data.worker_pool import ordered_map

    before = set(multiprocessing.active_children())
    results = ordered_map(abs, [-3], workers=2)
    assert next(results) == 3
    workers = [child for child in multiprocessing.active_children() if child not in before]
    assert len(workers) == 2
    for worker in workers:  # neither holds an item: the one result came back
        worker.kill()
        worker.join()
    assert list(results) == []
    assert set(multiprocessing.active_children()) <= before


def test_a_map_without_workers_is_refused_not_waited_for():
    # it waited forever for results no process would compute
    from pretrain.data.worker_pool import ordered_map

    with pytest.raises(ValueError, match="workers >= 1, got 0"):
        list(ordered_map(abs, [-3], 0))
