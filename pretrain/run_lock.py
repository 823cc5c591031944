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
from pretrain.config import ConfigError
from pretrain.distributed import share_refusal

LOCK_FILE = ".train.lock"
WAIT_S = 60.0  # a requeued job may start while its previous instance is still exiting


class RunDirBusy(CheckpointError):
    """Another job trains this run directory."""


class RunDirUnwritable(ConfigError):
    """train.run_dir cannot be created or written (a permission, a read-only or full filesystem,
    a file where a folder should be): the message names the path and the fix."""


def unwritable(run_dir: Path, err: OSError) -> str:
    """What a failed creation or write under `run_dir` says: where it failed and why, and the fix."""
    failed = Path(err.filename or run_dir)
    blocked = failed
    while not blocked.exists() and blocked != blocked.parent:  # the folder that refused the new entry
        blocked = blocked.parent
    other = "or give this run another train.run_dir"
    if err.errno in (errno.EACCES, errno.EPERM):
        why = f"permission denied on {blocked}"
        fix = f"make {blocked} writable for the user this job runs as (chmod, chown, or ask its owner), {other}"
    elif err.errno == errno.EROFS:
        why, fix = f"{blocked} is on a read-only filesystem", "give train.run_dir a folder on a writable one"
    elif err.errno == errno.ENOTDIR or (err.errno == errno.EEXIST and blocked.is_file()):  # EEXIST: run_dir itself
        why, fix = f"{blocked} is a file, not a folder", f"move it aside, {other}"
    elif err.errno in (errno.ENOSPC, errno.EDQUOT):
        why, fix = (
            f"{err.strerror} (writing {failed})",
            f"free space (or raise the quota) there, then run again; {other}",
        )
    else:
        why, fix = f"{err.strerror or err} ({failed})", f"fix the filesystem, {other}"
    return f"train.run_dir={run_dir} cannot be written: {why}. To run, {fix}"


class RunDirLock:
    """Taken by `acquire` (every rank calls it; rank 0 locks), released by `release` or process exit."""

    def __init__(self, run_dir: str | Path, is_main: bool):
        self.path = Path(run_dir) / LOCK_FILE
        self.is_main = is_main
        self.fd: int | None = None
        self.held = False  # on every rank: acquire() succeeded

    def acquire(self, say=print) -> None:
        """Lock the run directory (rank 0), or raise on every rank (a collective) RunDirBusy, or
        RunDirUnwritable where rank 0 cannot create or write the lock file."""
        problem = self._try_lock(say) if self.is_main else None
        share_refusal(problem, (RunDirBusy, RunDirUnwritable))
        self.held = True

    def _try_lock(self, say) -> RunDirBusy | RunDirUnwritable | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # told to every rank by acquire: raised here, it left them waiting
            return RunDirUnwritable(unwritable(self.path.parent, err))
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
                return RunDirBusy(
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
            err.filename = err.filename or str(self.path)
            return RunDirUnwritable(unwritable(self.path.parent, err))
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
