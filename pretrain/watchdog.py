"""Hang detection: a rank that makes no progress for `train.hang_timeout_s` reports where it
is stuck, and the job ends (or is requeued) instead of holding its nodes until the time limit.

A collective never completes when one rank stops taking part: its node froze, its process
was stopped, it waits on a dead filesystem, or it deadlocked. Every other rank then waits in
that collective, under the process group's timeout or forever, and nothing says which rank
is at fault.

The watcher is a small child process of each rank (`python -m pretrain.watchdog`), not a
thread: a rank stuck in C code that holds the interpreter lock (DeepSpeed's shared-memory
all-reduce spins that way while it waits for a peer) never lets a thread run. The trainer
calls `HangWatchdog.progress(what)` after every step, evaluation and checkpoint, one line on
a pipe. When no line comes for `timeout` seconds (`startup_timeout` until the first:
building, resuming, a universal-checkpoint conversion, compilation), the watcher

1. sends the rank SIGUSR2, on which `faulthandler` (C code, no interpreter lock needed)
   writes every thread's Python stack into a second pipe;
2. writes `<run_dir>/hangs/<attempt>/rank<r>.txt`: what the rank did last, its process state
   (from /proc: `T (stopped)` for a stopped process, which cannot answer), where its main
   thread is (the innermost frame, and the innermost frame of this project outside its generic
   collective helpers), the stacks;
3. on rank 0: waits up to `grace` seconds for the other ranks' reports, writes and prints
   `summary.txt`, which names the ranks that wrote no report or did not answer (a frozen
   node, a stopped process: the likely culprits; the others usually wait in a collective
   for them), then requeues the Slurm job, at most once per checkpoint
   (`requeue_after_hang`). Other ranks' watchers wait until rank 0's has published its decision
   (at most 2 x grace + 30 s), so that their kill, which ends the job step, comes after it;
4. kills the rank (SIGKILL), which ends the job step (srun --kill-on-bad-exit, torchrun).

`attempt` names the report folder and is the same on every rank (rank 0's start time).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pretrain.files import atomic_write
from pretrain.process_tree import stat_fields
from pretrain.slurm import stop_signals_blocked  # the standard library only
from pretrain.torchrun_restarts import restarted_now

REPORTS = "hangs"
SUMMARY = "summary.txt"
REQUEUE_RECORD = "requeued_from.txt"
DUMP_SIGNAL = signal.SIGUSR2  # faulthandler dumps the stacks on it; USR1 and TERM are the stop signals
START_UP = "none yet (start-up)"
# Ctrl-C and Slurm's stop signals, which reach the watcher too: it starts with them blocked, until its
# own dispositions are set (an interpreter's start-up takes a while, and they ended it there)
_WATCHER_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_DECISIONS = ("requeued", "not requeued")  # how requeue_after_hang's line, the summary's last, begins
_PROJECT_DIRS = ("pretrain", "kernels")
# the project's generic collective wrappers: a rank waiting in one is named by the caller that used it
# (`global_sums` says nothing; `write_checksums`, in a checkpoint's save, does)
_GENERIC_HELPERS = (os.sep + os.path.join("pretrain", "distributed.py"),)
_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def report_name(rank: int) -> str:
    return f"rank{rank:05d}.txt"


# ---- the rank's side ----------------------------------------------------------------------------
class HangWatchdog:
    """Starts this rank's watcher and tells it of progress (see the module docstring); a context
    manager. `timeout` 0 turns it off: nothing is started and `progress` does nothing."""

    def __init__(
        self,
        run_dir: str | Path,
        attempt: str,
        rank: int,
        world_size: int,
        timeout: float,
        startup_timeout: float,
        requeue: bool = False,
        grace: float | None = None,
    ):
        self.run_dir, self.attempt = Path(run_dir), attempt
        self.last_progress: str | None = None  # what the rank finished last (kept when unwatched too)
        self.rank, self.world_size = rank, world_size
        self.timeout, self.startup_timeout, self.requeue = timeout, startup_timeout, requeue
        # rank 0's watcher waits this long for the other reports; theirs outlive it by more
        self.grace = grace if grace is not None else max(10.0, min(30.0, timeout / 4))
        self._watcher: subprocess.Popen | None = None
        self._dump_pipe = None

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    def __enter__(self) -> HangWatchdog:
        if self.enabled:
            self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        dump_read, dump_write = os.pipe()
        args = [
            f"--parent={os.getpid()}",
            f"--main-thread={threading.main_thread().ident}",
            f"--dump-fd={dump_read}",
            f"--report-dir={self.run_dir / REPORTS / self.attempt}",
            f"--run-dir={self.run_dir}",
            f"--rank={self.rank}",
            f"--world-size={self.world_size}",
            f"--timeout={self.timeout}",
            f"--startup-timeout={self.startup_timeout}",
            f"--grace={self.grace}",
            *(["--requeue"] if self.requeue else []),
        ]
        path = [str(_PACKAGE_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        # before the watcher exists: SIGUSR2 would otherwise end the rank
        self._dump_pipe = os.fdopen(dump_write, "w")
        faulthandler.register(DUMP_SIGNAL, file=self._dump_pipe, all_threads=True, chain=False)
        with stop_signals_blocked(_WATCHER_SIGNALS):  # inherited through exec, until _Cancelled unblocks them
            self._watcher = subprocess.Popen(
                [sys.executable, "-m", "pretrain.watchdog", *args],
                stdin=subprocess.PIPE,
                pass_fds=(dump_read,),
                env=env,
            )
        os.close(dump_read)
        os.set_blocking(self._watcher.stdin.fileno(), False)  # a dead watcher must never block a step

    def progress(self, what: str) -> None:
        """The rank finished `what` (e.g. "step 12"): the next deadline is `timeout` from now."""
        self.last_progress = what
        self._send(f"progress {what}\n")

    def _send(self, line: str) -> None:
        if self._watcher is None:
            return
        try:
            os.write(self._watcher.stdin.fileno(), line.replace("\n", " ").rstrip().encode() + b"\n")
        except (BlockingIOError, BrokenPipeError):
            pass  # the watcher is gone or not reading: training goes on unwatched

    def close(self) -> None:
        if self._watcher is None:
            return
        self._send("close")
        self._watcher.stdin.close()
        try:
            self._watcher.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._watcher.kill()
            self._watcher.wait()
        faulthandler.unregister(DUMP_SIGNAL)
        self._dump_pipe.close()
        self._watcher = None


# ---- the watcher's side -----------------------------------------------------------------------
class _Cancelled:
    """Set when the watcher receives SIGTERM: Slurm is ending the job (scancel, preemption), so
    a hang must not requeue it. USR1 (the checkpoint-and-requeue warning) is the rank's business."""

    def __init__(self):
        self.flag = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHER_SIGNALS)  # one that came meanwhile acts now

    def _set(self, *_):
        self.flag = True


def watch(args: argparse.Namespace) -> int:
    """The watcher's loop: read progress lines from stdin until `close` or EOF (the rank ended);
    past the deadline, report, conclude and kill the rank."""
    cancelled = _Cancelled()
    stdin = sys.stdin.fileno()
    last, pending = START_UP, b""
    deadline = time.monotonic() + args.startup_timeout
    while True:
        ready, _, _ = select.select([stdin, args.dump_fd], [], [], min(1.0, max(0.0, deadline - time.monotonic())))
        if os.getppid() != args.parent:
            return 0  # the rank is gone (its data-loader workers may still hold the pipe open)
        if args.dump_fd in ready:  # a SIGUSR2 from elsewhere: drained, so that the pipe never fills
            os.read(args.dump_fd, 65536)
        if stdin not in ready:
            if time.monotonic() >= deadline:
                break
            continue
        chunk = os.read(stdin, 65536)
        if not chunk:
            return 0  # the rank exited (or was killed): nothing to watch
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            text = line.decode(errors="replace")
            if text == "close":
                return 0
            if text.startswith("progress "):
                last, deadline = text.removeprefix("progress "), time.monotonic() + args.timeout
    waited = args.startup_timeout if last == START_UP else args.timeout
    try:  # whatever fails on the way, the hung rank is killed: a job held until its time limit is the worst outcome
        report = Report(args.rank, args.world_size, args.parent, waited, last, *request_stacks(args), args.main_thread)
        report.publish(Path(args.report_dir))
        if args.rank == 0:
            conclude(args, cancelled, waited, last == START_UP)
        else:
            await_decision(args)
    finally:
        if os.getppid() == args.parent:  # else the rank is gone already (the launcher ended it), its pid free
            kill(args.parent)
    return 0


def await_decision(args: argparse.Namespace) -> None:
    """A rank other than 0: killing it ends the job step (srun --kill-on-bad-exit, torchrun), rank 0's
    watcher with it, so wait until that watcher has published its requeue decision (the summary's
    last line), at most 2 x grace + 30 s, or until this rank is gone."""
    summary = Path(args.report_dir) / SUMMARY
    deadline = time.monotonic() + 2 * args.grace + 30
    while time.monotonic() < deadline and os.getppid() == args.parent:
        try:
            if summary.read_text().rstrip("\n").rsplit("\n", 1)[-1].startswith(_DECISIONS):
                return
        except OSError:  # not written yet
            pass
        time.sleep(0.2)


def request_stacks(args: argparse.Namespace) -> tuple[str, str]:
    """(process state, every thread's stack) of the rank: SIGUSR2, then what faulthandler
    writes, read until it has been quiet for a second (or nothing, if the rank cannot run)."""
    state = process_state(args.parent)
    if state.startswith("T"):
        return state, ""  # a stopped process handles no signal until it is continued
    try:
        os.kill(args.parent, DUMP_SIGNAL)
    except ProcessLookupError:
        return state, ""
    chunks, quiet_until, give_up = [], time.monotonic() + 5, time.monotonic() + 20
    while time.monotonic() < min(quiet_until, give_up):
        ready, _, _ = select.select([args.dump_fd], [], [], 0.2)
        if ready:
            chunk = os.read(args.dump_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            quiet_until = time.monotonic() + 1
    return state, b"".join(chunks).decode(errors="replace")


def process_state(pid: int) -> str:
    """`/proc/<pid>/stat`'s state with its meaning, e.g. `T (stopped)`; `?` where unknown."""
    meaning = {"R": "running", "S": "sleeping", "D": "uninterruptible I/O", "T": "stopped", "Z": "zombie"}
    fields = stat_fields(pid)
    if not fields:
        return "?"
    code = fields[0]
    return f"{code} ({meaning.get(code, 'see man 5 proc')})"


def where(stacks: str, main_thread: int) -> str:
    """`file:line in function` of the main thread's innermost frame, and of the innermost frame
    in this project outside its generic helpers when that is another; from faulthandler's dump
    (most recent call first)."""
    blocks = re.split(r"^(?=(?:Current thread|Thread) 0x)", stacks, flags=re.M)
    block = next((b for b in blocks if re.match(rf"(?:Current thread|Thread) 0x0*{main_thread:x}\b", b)), None)
    if block is None:
        return "?"
    frames = re.findall(r'^\s+File "(.*)", line (\d+) in (\S+)', block, re.M)
    if not frames:
        return "?"
    text = _frame(*frames[0])
    own = next((f for f in frames if _is_project(f[0]) and not f[0].endswith(_GENERIC_HELPERS)), None)
    if own is not None and own is not frames[0]:
        text += f", called from {_frame(*own)}"
    return text


def _is_project(filename: str) -> bool:
    return any(f"{os.sep}{d}{os.sep}" in filename for d in _PROJECT_DIRS)


def _frame(filename: str, line: str, function: str) -> str:
    return f"{_short(filename)}:{line} in {function}"


def _short(filename: str) -> str:
    """The path from the package folder on (`torch/distributed/...`, `pretrain/train.py`,
    `python3.11/re/__init__.py`)."""
    parts = Path(filename).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("site-packages", "dist-packages"):
            return "/".join(parts[i + 1 :])
    for i, part in enumerate(parts):
        if part in _PROJECT_DIRS or (part.startswith("python3.") and i > 0 and parts[i - 1] == "lib"):
            return "/".join(parts[i:])
    return filename


class Report:
    """One rank's hang report: a header of `key: value` lines, then the stacks."""

    def __init__(self, rank, world_size, pid, waited, last, state, stacks, main_thread=None):
        self.rank, self.world_size, self.pid, self.waited, self.last = rank, world_size, pid, waited, last
        self.state, self.stacks = state, stacks
        self.main_thread = main_thread

    def text(self, position: str) -> str:
        answered = "yes" if self.stacks else "no (stopped, or stuck where no signal is handled)"
        return (
            f"memlayers hang report: rank {self.rank} of {self.world_size} on {socket.gethostname()} "
            f"(pid {self.pid}), {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, no progress for {self.waited:g} s\n"
            f"last progress: {self.last}\n"
            f"process state: {self.state}\n"
            f"answered the stack dump: {answered}\n"
            f"where: {position}\n\n"
            f"{self.stacks}"
        )

    def publish(self, report_dir: Path) -> None:
        position = where(self.stacks, self.main_thread) if self.stacks and self.main_thread else "?"
        path = report_dir / report_name(self.rank)
        try:
            atomic_write(path, self.text(position))
            saved = f"; every thread's stack in {path}"
        except OSError as err:  # the filesystem may be what hangs: still say where the rank is
            saved = f"; the report could not be written ({err})"
        print(
            f"rank {self.rank}: no progress for {self.waited:g} s after {self.last}; process {self.state}; "
            f"main thread at {position}{saved}",
            file=sys.stderr,
            flush=True,
        )


def summarize(report_dir: Path, world_size: int, timeout: float, start_up: bool = False) -> str:
    """Rank 0's account of a hang from the reports in `report_dir`: each reporting rank's last
    progress, state and position; first, the ranks that wrote no report or did not answer.
    `timeout`: what rank 0 waited, train.startup_timeout_s where it had no step yet (`start_up`)."""
    lines, suspects = [], []
    for rank in range(world_size):
        path = report_dir / report_name(rank)
        if not path.is_file():
            suspects.append(f"{rank} (no report)")
            continue
        fields = dict(line.split(": ", 1) for line in path.read_text().splitlines()[1:6] if ": " in line)
        if not fields.get("answered the stack dump", "").startswith("yes"):
            suspects.append(f"{rank} ({fields.get('process state', '?')}, did not answer)")
        lines.append(
            f"  rank {rank}: last progress {fields.get('last progress', '?')}; "
            f"process {fields.get('process state', '?')}; at {fields.get('where', '?')}"
        )
    setting = "train.startup_timeout_s, before the first step" if start_up else "train.hang_timeout_s"
    head = f"hang: no rank progressed for {timeout:g} s ({setting})."
    if suspects:
        head += f" Look first at rank {', '.join(suspects)}; the others usually wait for it in a collective."
    return "\n".join([head, f"reports: {report_dir}", *lines])


def conclude(args: argparse.Namespace, cancelled: _Cancelled, waited: float, start_up: bool) -> None:
    """Rank 0: wait for the others' reports, publish the summary, then decide on a requeue. `waited`: the
    allowance that ran out (the start-up one where the rank had no step yet, `start_up`)."""
    report_dir = Path(args.report_dir)
    others = [report_dir / report_name(r) for r in range(1, args.world_size)]
    deadline = time.monotonic() + args.grace
    while time.monotonic() < deadline and not all(p.is_file() for p in others):
        time.sleep(0.2)
    summary = summarize(report_dir, args.world_size, waited, start_up)
    _publish_summary(report_dir, summary)
    print(summary, file=sys.stderr, flush=True)
    decision = requeue_after_hang(args.run_dir, Path(args.run_dir) / "checkpoints", cancelled.flag, args.requeue)
    _publish_summary(report_dir, f"{summary}\n{decision}")
    print(decision, file=sys.stderr, flush=True)


def _publish_summary(report_dir: Path, text: str) -> None:
    try:
        atomic_write(report_dir / SUMMARY, text + "\n")
    except OSError:
        pass


def requeue_after_hang(run_dir: str | Path, checkpoint_root: str | Path, cancelled: bool, requeue: bool) -> str:
    """Rank 0's decision after a hang, as one line: requeue the Slurm job, at most once per
    checkpoint (a run that hangs again before it saves a new one would hang in a loop), and
    never once the job is being cancelled."""
    from pretrain.checkpoint import CheckpointError, latest_checkpoint
    from pretrain.slurm import requeue_job

    if not requeue:
        return "not requeued: train.requeue_on_hang=false"
    if cancelled:
        return "not requeued: SIGTERM was received (the job is being cancelled)"
    try:
        latest = latest_checkpoint(checkpoint_root)
    except CheckpointError as err:  # a requeued job could not resume from it either
        return f"not requeued: the latest checkpoint cannot be read ({err}); fix it, then resubmit with --resume"
    tag = latest.name if latest is not None else "(no checkpoint)"
    record = Path(run_dir) / REPORTS / REQUEUE_RECORD
    try:
        if record.is_file() and record.read_text().strip() == tag:
            return (
                f"not requeued: the run already hung and was requeued since its last checkpoint {tag}; "
                "read the reports, then resubmit with --resume"
            )
        if "SLURM_JOB_ID" not in os.environ:
            restarted = restarted_now()  # torchrun --max-restarts, one left
            if restarted:
                return f"not requeued (not a Slurm job): {restarted}, which resumes from {tag}"
            return f"not requeued (not a Slurm job): restart the run to resume from {tag}"
        atomic_write(record, tag + "\n")
    except OSError as err:  # without the record, a run that hangs again would be requeued in a loop
        return f"not requeued: {record} (requeues once per checkpoint) could not be read or written: {err}"
    if requeue_job(stop=None):
        return f"requeued: the job restarts from checkpoint {tag}"
    return "not requeued: the requeue failed (see above)"


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)  # also ends a stopped process
    except ProcessLookupError:
        pass


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="the hang watcher of one rank (started by HangWatchdog)")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--main-thread", type=int, required=True)
    parser.add_argument("--dump-fd", type=int, required=True)
    parser.add_argument("--report-dir", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--timeout", type=float, required=True)
    parser.add_argument("--startup-timeout", type=float, required=True)
    parser.add_argument("--grace", type=float, required=True)
    parser.add_argument("--requeue", action="store_true")
    return watch(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
