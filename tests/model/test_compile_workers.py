"""pretrain.compile_workers: a process that compiled exits in seconds, not after torch's 300 s
wait for a compile-worker sidecar that does not stop (torch 2.11 + Python 3.12, the GPU image;
tools/check_torch211.sh runs this file there)."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pretrain.compile_workers import end_sidecar
from pretrain.process_tree import children_of

ROOT = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_process_whose_pool_got_no_job_yet_exits_and_leaves_no_sidecar(tmp_path):
    """The cold start: the first CUDA compile makes the pool (its ready job sent), the process ends
    before the sidecar has read it. Under torch 2.11 + Python 3.12 such an exit took 302 s (the
    sidecar's workers never told to stop); torch's own API and exit path, as compile_fx drives them."""
    pid_file = tmp_path / "sidecar.pid"
    script = textwrap.dedent(
        f"""
        from pretrain.compile_workers import end_compile_workers_at_exit
        from torch._inductor.async_compile import AsyncCompile
        from torch._inductor.compile_worker.subproc_pool import SubprocPool

        end_compile_workers_at_exit()
        AsyncCompile.use_process_pool()  # what compile_fx's wakeup() does on the first CUDA compile
        pool = AsyncCompile.process_pool()
        if isinstance(pool, SubprocPool):
            open({str(pid_file)!r}, "w").write(str(pool.process.pid))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCHINDUCTOR_COMPILE_THREADS": "2"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr
    if pid_file.exists():  # a torch whose pool has a sidecar
        assert not _alive(int(pid_file.read_text())), "the compile-worker sidecar outlived its process"


class _StuckPool:
    """Stands in for torch's SubprocPool: `shutdown` waits 300 s for a sidecar that waits for ever on
    its own child (as torch 2.11's sidecar joins compile workers that were never told to stop)."""

    def __init__(self):
        code = "import subprocess, sys; subprocess.run([sys.executable, '-c', 'import time; time.sleep(600)'])"
        self.process = subprocess.Popen([sys.executable, "-c", code])
        self.shutdown_calls = 0

    def shutdown(self):
        self.shutdown_calls += 1
        self.process.wait(300)


@pytest.mark.parametrize("pidfds", [True, False])
def test_a_sidecar_that_does_not_stop_is_ended_with_its_workers(pidfds, monkeypatch):
    if not pidfds:  # a system without them (Linux < 5.3): by process id, as before
        monkeypatch.delattr(os, "pidfd_open", raising=False)
    pool = _StuckPool()
    try:
        for _ in range(200):  # its child started
            children = children_of(pool.process.pid)
            if children:
                break
            subprocess.run(["sleep", "0.05"])
        assert children, "the stand-in sidecar started no child"
        end_sidecar(pool, pool.process, grace_s=0.5)
        assert pool.shutdown_calls == 1
        assert pool.process.returncode is not None
        assert not any(_alive(pid) for pid in children)
    finally:
        pool.process.kill()
        pool.process.wait()


def test_a_sidecar_that_stops_is_not_killed():
    """A sidecar that stops within the grace ends by itself (exit status 0, not SIGKILL)."""

    class _Pool:
        process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.2)"])

        def shutdown(self):
            self.process.wait(300)

    pool = _Pool()
    end_sidecar(pool, pool.process, grace_s=5.0)
    assert pool.process.returncode == 0


def test_an_alarm_set_before_is_kept():
    """The bounded end borrows the process's one real-time timer: an alarm another part of the
    process had set (an exit-time limit, say) is set again after, with the time it had left."""
    import signal

    class _Pool:
        process = subprocess.Popen([sys.executable, "-c", "pass"])

        def shutdown(self):
            self.process.wait(300)

    fired = []

    def handler(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        pool = _Pool()
        end_sidecar(pool, pool.process, grace_s=5.0)
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 50.0 < left <= 100.0, left
        assert signal.getsignal(signal.SIGALRM) is handler and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _child_with_pid(pid: int) -> subprocess.Popen | None:
    """A new child process given the id `pid` (the kernel's next id set by /proc/sys/kernel/ns_last_pid,
    root only), or None where that cannot be done or another process takes the id first."""
    for _ in range(50):
        try:
            Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        except OSError:
            return None
        child = subprocess.Popen(["sleep", "60"])
        if child.pid == pid:
            return child
        child.kill()
        child.wait()
    return None


class _ReapedMidWait:
    """torch's wait (Popen.wait) interrupted by the alarm after it collected the sidecar's exit and
    before it recorded it (it holds Popen's wait lock there, so poll() says None); meanwhile a new
    process got the sidecar's id."""

    def __init__(self):
        self.process = subprocess.Popen(["sleep", "60"])
        self.stranger = None

    def shutdown(self):
        with self.process._waitpid_lock:
            self.process.terminate()
            os.waitpid(self.process.pid, 0)
            self.stranger = _child_with_pid(self.process.pid)
            time.sleep(1.0)  # the alarm's two steps (grace 0.2 s) come in here
        self.process.returncode = -15


def test_a_process_given_the_collected_sidecars_id_is_not_killed():
    """The alarm's SIGKILLs went by process id: a process that got the id of a sidecar whose exit was
    collected was killed in its place (reproduced: the stranger ended by SIGKILL). The reference is the
    stranger, alive after the sidecar's end."""
    if not hasattr(os, "pidfd_open"):
        pytest.skip("no pidfds in this Python")
    pool = _ReapedMidWait()
    try:
        end_sidecar(pool, pool.process, grace_s=0.2)
        if pool.stranger is None:
            pytest.skip("could not give a new process the sidecar's id (needs root; another process took it)")
        assert pool.stranger.poll() is None, f"the stranger ended with {pool.stranger.returncode}"
    finally:
        if pool.stranger is not None:
            pool.stranger.kill()
            pool.stranger.wait()
