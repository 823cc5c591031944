"""One training job per run directory: rank 0 holds an exclusive `flock` on
`<run_dir>/.train.lock` until the run ends, taken before it reads the checkpoint of an existing
run directory (or, in a new one, before its first write there), and a second job (a hand-made `sbatch` of the rendered script, a resubmission while the first still
runs, two shells on one directory) is refused, naming the holder, before it writes anything.
Two jobs used to train the directory at once, each overwriting `latest` and pruning the
other's checkpoints. The kernel releases the lock when its holder dies (kill -9 included), so
nothing is ever left to clean up; a holder that is still ending (a requeued job's previous
instance) is waited for up to `WAIT_S` seconds. A filesystem without `flock` (some Lustre
mounts) cannot hold the lock: the run says so and goes on unlocked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from pretrain.checkpoint import CheckpointError
from pretrain.distributed import share_refusal

LOCK_FILE = ".train.lock"
WAIT_S = 60.0  # a requeued job may start while its previous instance is still exiting


class RunDirBusy(CheckpointError):
    """Another job trains this run directory."""


class RunDirLock:
    """Taken by `acquire` (every rank calls it; rank 0 locks), released by `release` or process exit."""

    def __init__(self, run_dir: str | Path, is_main: bool):
        self.path = Path(run_dir) / LOCK_FILE
        self.is_main = is_main
        self.fd: int | None = None
        self.held = False  # on every rank: acquire() succeeded

    def acquire(self, say=print) -> None:
        """Lock the run directory (rank 0), or raise RunDirBusy on every rank (a collective)."""
        problem = self._try_lock(say) if self.is_main else None
        share_refusal(None if problem is None else RunDirBusy(problem), (RunDirBusy,))
        self.held = True

    def _try_lock(self, say) -> str | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # told to every rank by acquire: raised here, it left them waiting
            return f"cannot create {self.path} ({err}): train.run_dir must be a writable folder"
        deadline, waited = time.monotonic() + WAIT_S, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno not in (errno.EAGAIN, errno.EACCES):  # ENOSYS, ENOLCK, EINVAL: no flock here
                    os.close(fd)
                    say(f"warning: {self.path.parent} cannot be locked ({err.strerror}): nothing stops a second job")
                    return None
            if time.monotonic() >= deadline:
                holder = _read(fd) or "unknown"
                os.close(fd)
                return (
                    f"another job trains {self.path.parent} (it holds {self.path}: {holder}); two jobs on one run "
                    "directory overwrite each other's checkpoints. Wait for it to end or scancel it (it checkpoints "
                    "on the way out), then run again; or give this run another train.run_dir"
                )
            if not waited:
                say(f"waiting up to {WAIT_S:.0f} s for the job holding {self.path} ({_read(fd) or 'unknown'}) to end")
                waited = True
            time.sleep(1.0)
        job = os.environ.get("SLURM_JOB_ID")
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}{f' job {job}' if job else ''}\n".encode())
        except OSError as err:  # a full disk or quota: told to every rank by acquire, as above
            os.close(fd)  # releases the lock
            return f"cannot write {self.path} ({err}): free space on train.run_dir's filesystem, then run again"
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            # Unlocked before closing: processes forked meanwhile (data-loader workers) share the
            # descriptor, and a close would leave the lock held until the last of them exits.
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        self.held = False


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip()
    except OSError:
        return ""
