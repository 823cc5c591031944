"""A TensorBoard write that rank 0's filesystem refuses (a full disk, a quota) stops TensorBoard,
said once, and training goes on on every rank. It was raised on rank 0 alone, in the middle of a
step (TensorBoard's writer thread re-raises its failure at the next scalar): rank 0 left with a bare
OSError and the others waited in their next collective until the hang watchdog fired (measured on
a 64 MB tmpfs filled at step 3: rank 1 still waiting when the test gave up, 45 s later), which then
requeued a job that would fail again."""

from __future__ import annotations

import errno
from pathlib import Path

from tests.train.helpers import rank_results, tiny_config


def _full_disk_under_tensorboard(rank: int, run: str, cache: str) -> dict:
    import contextlib
    import io

    from torch.utils.tensorboard import SummaryWriter

    from pretrain.train import train

    real = SummaryWriter.add_scalar

    def failing(self, tag, value, step, *args, **kwargs):
        if step >= 2:  # as the writer thread re-raises a failed write of its event file
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(self, tag, value, step, *args, **kwargs)

    SummaryWriter.add_scalar = failing
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(tiny_config(Path(run), Path(cache), "train.max_steps=4", "train.checkpoint_every=2"))
    return {"step": result.step, "checkpoint": Path(result.checkpoint).name, "printed": printed.getvalue()}


def test_a_refused_tensorboard_write_is_said_once_and_training_goes_on(tmp_path, data_cache):
    ranks = rank_results(2, _full_disk_under_tensorboard, (str(tmp_path / "run"), str(data_cache)), tmp_path, 120)
    for result in ranks:
        assert result["step"] == 4 and result["checkpoint"] == "step_00000004"
    warning = (
        f"warning: TensorBoard cannot write {tmp_path / 'run' / 'tensorboard'} ([Errno 28] No space left on device "
        "(injected)): it logs nothing more in this run; training goes on"
    )
    assert ranks[0]["printed"].count(warning) == 1
    assert "step 4" in ranks[0]["printed"].rsplit(warning, 1)[1]  # the console log went on


_REFUSED_IN_THE_WRITER_THREAD = """
import errno, sys, threading, time
from tensorboard.summary.writer import record_writer
from pretrain.metrics import MetricsLogger

real, writes = record_writer.RecordWriter.write, []

def refusing(self, data):  # in TensorBoard's writer thread, as a full disk refuses its event file
    writes.append(data)
    if len(writes) > 2:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")
    return real(self, data)

record_writer.RecordWriter.write = refusing
metrics = MetricsLogger(sys.argv[1], True)
for step in range(5):
    metrics.scalars({"train/loss": 1.0}, step)
    time.sleep(0.2)
metrics.close()

def other():  # any other thread's error is still printed
    raise OSError(errno.EIO, "another thread's error")

thread = threading.Thread(target=other, name="other")
thread.start()
thread.join()
"""


def test_the_writer_threads_own_traceback_of_a_refused_write_is_left_out(tmp_path):
    """TensorBoard's writer thread printed its traceback ("Exception in thread Thread-1: ...
    OSError: [Errno 28] No space left on device") beside the run's one warning: read as a crash.
    Run in a process of its own: pytest replaces threading.excepthook during tests."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", _REFUSED_IN_THE_WRITER_THREAD, str(tmp_path / "tensorboard")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("warning: TensorBoard cannot write") == 1, done.stdout
    assert "No space left on device" not in done.stderr, done.stderr
    assert "Exception in thread other" in done.stderr and "another thread's error" in done.stderr, done.stderr
