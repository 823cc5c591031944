"""The hang watchdog (pretrain/watchdog.py), on real processes: a rank without progress gets
its stacks dumped (even while it holds the interpreter lock), reported and killed; a stopped
rank is reported as such; progress and the start-up allowance keep it quiet; the watcher ends
with its rank; rank 0's summary names the ranks to look at first; the requeue after a hang
happens once per checkpoint.

The whole path on a real cluster (a SIGSTOPped rank, the report, the requeue, the resume) is
tests/slurm/test_slurm_cluster.py::test_stopped_rank_is_reported_and_the_job_requeued."""

from __future__ import annotations

import faulthandler
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.watchdog import REPORTS, Report, report_name, requeue_after_hang, summarize, where

REPO_ROOT = Path(__file__).resolve().parents[2]


def rank_process(
    tmp_path: Path, body: str, timeout: float, startup_timeout: float = 5, rank: int = 0, world_size: int = 1
) -> subprocess.Popen:
    """A stand-in rank: a Python process that starts a HangWatchdog and runs `body` inside it."""
    script = textwrap.dedent(
        f"""
        import os, re, sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from pretrain.watchdog import HangWatchdog

        with HangWatchdog({str(tmp_path)!r}, "attempt", rank={rank}, world_size={world_size}, timeout={timeout},
                          startup_timeout={startup_timeout}, requeue=True, grace=0.1) as watchdog:
        """
    ) + textwrap.indent(textwrap.dedent(body), "    ")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def report(tmp_path: Path) -> str:
    return (tmp_path / REPORTS / "attempt" / report_name(0)).read_text()


def test_rank_spinning_in_c_code_is_dumped_reported_and_killed(tmp_path):
    """Stuck in a regular expression that backtracks for ages: C code that never lets another
    thread of its process run (a watcher thread would never fire). The watcher process gets the
    stack through faulthandler, reports the stuck function and kills the rank."""
    body = """
    def spin_in_c():
        re.match(r"(a+)+$", "a" * 64 + "b")

    watchdog.progress("step 7")
    spin_in_c()
    """
    start = time.monotonic()
    rank = rank_process(tmp_path, body, timeout=0.5)
    _, stderr = rank.communicate(timeout=120)
    assert rank.returncode == -signal.SIGKILL, stderr
    assert time.monotonic() - start < 60
    position = "main thread at python3.{}/re/__init__.py:".format(sys.version_info.minor)
    assert f"rank 0: no progress for 0.5 s after step 7; process R (running); {position}" in stderr
    text = report(tmp_path)
    assert "last progress: step 7" in text and "answered the stack dump: yes" in text
    assert re.search(r"^where: python3\.\d+/re/__init__\.py:\d+ in match$", text, re.M), text
    assert re.search(r'^  File "<string>", line \d+ in spin_in_c$', text, re.M), text
    summary = (tmp_path / REPORTS / "attempt" / "summary.txt").read_text()
    assert summary.startswith("hang: no rank progressed for 0.5 s") and "Look first" not in summary
    assert summary.rstrip().endswith("not requeued (not a Slurm job): restart the run to resume from (no checkpoint)")


def test_stopped_rank_is_reported_as_stopped(tmp_path):
    """A stopped process (a frozen node, SIGSTOP) cannot dump its stacks: its watcher says so,
    with the process state, and the summary names it first."""
    rank = rank_process(tmp_path, 'watchdog.progress("step 3")\nprint("ready", flush=True)\ntime.sleep(120)\n', 0.5)
    assert rank.stdout.readline() == "ready\n"
    os.kill(rank.pid, signal.SIGSTOP)
    _, stderr = rank.communicate(timeout=120)
    assert rank.returncode == -signal.SIGKILL, stderr
    text = report(tmp_path)
    assert "process state: T (stopped)" in text and "answered the stack dump: no" in text
    assert "where: ?" in text
    summary = (tmp_path / REPORTS / "attempt" / "summary.txt").read_text()
    assert "Look first at rank 0 (T (stopped), did not answer)" in summary


def test_a_hang_at_start_up_is_summarized_with_the_start_up_allowance(tmp_path):
    """A rank that never finished a step (a peer on another node died before the ranks connected,
    and this one waits in gloo's group set-up) is ended after train.startup_timeout_s: the summary
    said 'no rank progressed for 600 s (train.hang_timeout_s)' there, 40 s into a 2-node run."""
    rank = rank_process(tmp_path, "time.sleep(120)\n", timeout=600, startup_timeout=0.5)
    _, stderr = rank.communicate(timeout=120)
    assert rank.returncode == -signal.SIGKILL, stderr
    assert "rank 0: no progress for 0.5 s after none yet (start-up)" in stderr
    summary = (tmp_path / REPORTS / "attempt" / "summary.txt").read_text()
    assert summary.startswith("hang: no rank progressed for 0.5 s (train.startup_timeout_s, before the first step).")


def test_progress_and_the_start_up_allowance_keep_it_quiet(tmp_path):
    body = """
    time.sleep(1.5)  # longer than the step timeout, within the start-up allowance
    for step in range(25):  # 2.5 s: more than twice the timeout, never a second without progress
        time.sleep(0.1)
        watchdog.progress(f"step {step}")
    print("done", flush=True)
    """
    rank = rank_process(tmp_path, body, timeout=1.0, startup_timeout=3.0)
    stdout, stderr = rank.communicate(timeout=120)
    assert rank.returncode == 0 and stdout == "done\n", stderr
    assert not (tmp_path / REPORTS).exists()


def test_stray_dump_signals_never_block_the_rank(tmp_path):
    """SIGUSR2 sent by someone else dumps the stacks into the pipe the watcher reads only on a
    hang: it drains the pipe meanwhile, so 3000 dumps (far more than a pipe holds) block nothing."""
    body = """
    import signal
    for step in range(3000):
        os.kill(os.getpid(), signal.SIGUSR2)
        watchdog.progress(f"step {step}")
    print("done", flush=True)
    """
    rank = rank_process(tmp_path, body, timeout=5.0)
    stdout, stderr = rank.communicate(timeout=120)
    assert rank.returncode == 0 and stdout == "done\n", stderr
    assert not (tmp_path / REPORTS).exists()


def test_watcher_ends_with_its_rank(tmp_path):
    """A rank that dies without closing its watchdog leaves no watcher behind, and no report,
    even while a forked child of it (a data-loader worker) still holds the progress pipe open."""
    body = """
    if os.fork() == 0:
        time.sleep(20)
        os._exit(0)
    print(watchdog._watcher.pid, flush=True)
    os._exit(3)
    """
    rank = rank_process(tmp_path, body, timeout=0.5)
    watcher = int(rank.stdout.readline())
    assert rank.wait(timeout=60) == 3
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and Path(f"/proc/{watcher}").exists():
        time.sleep(0.05)
    assert not Path(f"/proc/{watcher}").exists() or "Z" in Path(f"/proc/{watcher}/stat").read_text().split()[2]
    time.sleep(1)  # past the timeout: a watcher still watching would have written a report
    assert not (tmp_path / REPORTS).exists()


def test_summary_names_the_ranks_to_look_at_first(tmp_path):
    report_dir = tmp_path / REPORTS / "a"
    dump = 'Thread 0x00000000000000ab (most recent call first):\n  File "/x/pretrain/train.py", line 9 in fit\n'
    Report(0, 4, 100, 10, "step 41", "S (sleeping)", dump, 0xAB).publish(report_dir)
    Report(1, 4, 101, 10, "step 41", "T (stopped)", "").publish(report_dir)
    Report(2, 4, 102, 10, "step 41", "S (sleeping)", dump, 0xAB).publish(report_dir)
    summary = summarize(report_dir, world_size=4, timeout=10).splitlines()
    assert summary[0] == (
        "hang: no rank progressed for 10 s (train.hang_timeout_s). Look first at rank 1 (T (stopped), did not "
        "answer), 3 (no report); the others usually wait for it in a collective."
    )
    assert summary[2] == "  rank 0: last progress step 41; process S (sleeping); at pretrain/train.py:9 in fit"
    assert summary[3].startswith("  rank 1: last progress step 41; process T (stopped); at ?")
    assert len(summary) == 5


def _checkpoint(root: Path, step: int) -> None:
    tag = f"step_{step:08d}"
    (root / tag).mkdir(parents=True)
    (root / "latest").write_text(tag)


def test_requeue_after_hang_once_per_checkpoint(tmp_path, monkeypatch):
    import pretrain.slurm

    requeued = []
    monkeypatch.setattr(pretrain.slurm, "requeue_job", lambda stop: requeued.append(stop) or True)
    root = tmp_path / "checkpoints"
    _checkpoint(root, 4)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert requeue_after_hang(tmp_path, root, False, True).startswith("not requeued (not a Slurm job)")
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert requeue_after_hang(tmp_path, root, False, False) == "not requeued: train.requeue_on_hang=false"
    cancelled = requeue_after_hang(tmp_path, root, True, True)
    assert cancelled == "not requeued: SIGTERM was received (the job is being cancelled)"
    assert requeued == []

    first = requeue_after_hang(tmp_path, root, False, True)
    assert first == "requeued: the job restarts from checkpoint step_00000004" and len(requeued) == 1
    again = requeue_after_hang(tmp_path, root, False, True)
    assert again.startswith("not requeued: the run already hung and was requeued since its last checkpoint")
    assert len(requeued) == 1
    _checkpoint(root, 6)  # the requeued run made progress: a later hang is requeued again
    assert requeue_after_hang(tmp_path, root, False, True).endswith("step_00000006")
    assert len(requeued) == 2


@pytest.mark.parametrize(
    "override, refusal",
    [
        (
            "train.hang_timeout_s=-1",
            r"train\.hang_timeout_s=-1\.0 must be a number of seconds >= 0, 0 turning hang detection off ",
        ),
        ("train.startup_timeout_s=0", r"train\.startup_timeout_s=0\.0 must be a number of seconds > 0 "),
        ("train.startup_timeout_s=-5", r"train\.startup_timeout_s=-5\.0 must be a number of seconds > 0 "),
    ],
)
def test_bad_timeouts_are_refused(override, refusal):
    with pytest.raises(ConfigError, match=refusal):
        load_config(None, [override])
    assert load_config(None, ["train.hang_timeout_s=0"]).train.hang_timeout_s == 0  # off


def test_a_checkpoint_or_record_that_cannot_be_read_stops_the_requeue_not_the_kill(tmp_path, monkeypatch):
    """rank 0's decision after a hang reads checkpoints/latest and writes hangs/requeued_from.txt;
    either failing is reported as the reason for no requeue (the watcher used to die of it, and
    the hung rank was never killed)."""
    import pretrain.slurm

    requeued = []
    monkeypatch.setattr(pretrain.slurm, "requeue_job", lambda stop: requeued.append(stop) or True)
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / "latest").write_text("step_00000004")  # names a checkpoint that is not there
    decision = requeue_after_hang(tmp_path, root, False, True)
    assert decision.startswith("not requeued: the latest checkpoint cannot be read (")
    assert "step_00000004" in decision and decision.endswith("fix it, then resubmit with --resume")
    _checkpoint(root, 6)
    (tmp_path / REPORTS / "requeued_from.txt").mkdir(parents=True)  # cannot be read or replaced
    decision = requeue_after_hang(tmp_path, root, False, True)
    assert decision.startswith(f"not requeued: {tmp_path / REPORTS / 'requeued_from.txt'} (requeues once per")
    assert requeued == []


def test_the_hung_rank_is_killed_even_when_the_requeue_decision_fails(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step_00000004")  # missing: latest_checkpoint raises
    rank = rank_process(tmp_path, 'watchdog.progress("step 4")\ntime.sleep(30)\n', timeout=0.5)
    _, stderr = rank.communicate(timeout=120)
    assert rank.returncode == -signal.SIGKILL, stderr
    summary = (tmp_path / REPORTS / "attempt" / "summary.txt").read_text()
    assert "not requeued: the latest checkpoint cannot be read" in summary.splitlines()[-1]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_as_the_watcher_starts_leaves_it_watching(tmp_path, sig):
    """Ctrl-C reaches every process of the terminal's job, Slurm's stop signals every process of the job
    step: one arriving while the watcher's interpreter starts, before it ignores them, ended it (a
    KeyboardInterrupt traceback for Ctrl-C) and the rank went on unwatched. Here it arrives right after
    the watcher's exec; the rank then hangs, and must still be reported and killed."""
    body = f"""
    import signal
    os.kill(watchdog._watcher.pid, {int(sig)})
    watchdog.progress("step 1")
    time.sleep(30)
    """
    rank = rank_process(tmp_path, body, timeout=1.0)
    _, stderr = rank.communicate(timeout=120)
    assert rank.returncode == -signal.SIGKILL, stderr
    assert "KeyboardInterrupt" not in stderr
    assert "last progress: step 1" in report(tmp_path)


def test_where_names_the_caller_of_a_generic_collective_helper(tmp_path):
    """A rank waiting in `global_sums` (pretrain/distributed.py) is named by the project frame that
    called it, the checkpoint's `write_checksums`, not by the helper, which says nothing of where
    in the run it waits. The stack is real, dumped by faulthandler from functions compiled under
    those file names; the reference is the call chain written here."""
    files = {
        "c10d": tmp_path / "site-packages" / "torch" / "distributed" / "distributed_c10d.py",
        "helper": tmp_path / "repo" / "pretrain" / "distributed.py",
        "caller": tmp_path / "repo" / "pretrain" / "checksums.py",
    }
    dump = tmp_path / "dump.txt"
    scope = {"faulthandler": faulthandler, "dump": dump}
    sources = {
        "c10d": "def all_reduce():\n    with open(dump, 'w') as fh:\n        faulthandler.dump_traceback(fh)\n",
        "helper": "def global_sums():\n    all_reduce()\n",
        "caller": "def write_checksums():\n    global_sums()\n",
    }
    for name, source in sources.items():
        exec(compile(source, str(files[name]), "exec"), scope)
    scope["write_checksums"]()

    position = where(dump.read_text(), threading.get_ident())

    assert position == (
        "torch/distributed/distributed_c10d.py:3 in all_reduce, called from pretrain/checksums.py:2 in write_checksums"
    )


def test_another_ranks_watcher_kills_it_once_rank_0_has_decided(tmp_path):
    """A rank other than 0 is killed only after rank 0's watcher has published its requeue decision
    (killing it ends the job step, rank 0's watcher with it), but then at once: it used to sleep a
    fixed 2 x grace + 30 s, which under torchrun kept the stopped rank alive until torchrun's own
    30 s shutdown timeout SIGKILLed it (measured: the job ended 30 s after rank 0's kill)."""
    proc = rank_process(tmp_path, "time.sleep(600)", timeout=1, startup_timeout=1, rank=1, world_size=2)
    folder = tmp_path / REPORTS / "attempt"
    deadline = time.monotonic() + 60
    while not (folder / report_name(1)).is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (folder / report_name(1)).is_file(), proc.stderr.read() if proc.poll() is not None else ""
    summary = "hang: no rank progressed for 1 s (train.hang_timeout_s).\nreports: ...\n  rank 1: last progress ..."
    (folder / "summary.txt").write_text(summary + "\n")  # rank 0's summary before its decision
    time.sleep(2)
    assert proc.poll() is None  # still waiting for the decision
    (folder / "summary.txt").write_text(f"{summary}\nnot requeued (not a Slurm job): restart the run to resume\n")
    assert proc.wait(timeout=15) == -signal.SIGKILL  # within the 30 s it used to sleep
