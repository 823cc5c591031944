"""Stale build locks of JIT-compiled ops (torch.utils.cpp_extension: memlayers' CPU ops, DeepSpeed's).

A process that builds an op holds `<extensions dir>/<op>/lock` while it compiles; the others
wait for that file to go. A build killed mid-way (a preempted or timed-out job, `kill -9`)
leaves the file behind, and every later process that loads the op then waits forever at start-up,
silently. `clear_stale_build_locks()` waits for a lock while it is younger than `max_age_s` (a
build takes under a minute: a live one finishes meanwhile) and removes one older than that,
saying which. Runs before anything loads an op: at trainer start and before the CPU ops load.

Every rank of a job clears at start-up, and the ranks build as soon as the lock is gone, so a
lock may be replaced between reading its age and removing it (another rank removed the stale
lock and a build took it afresh). Removing by path would then delete that build's lock and let a
second build run beside it. So the clearing processes take turns (`flock` on a file in the
extensions folder, where the filesystem offers it), and a stale lock is renamed aside first and
removed only if the file moved is the one whose age was read (same inode and mtime); a fresh
lock caught instead is linked back under its name (a link never replaces a lock taken meanwhile).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

MAX_AGE_S = 600.0  # ten times the longest build seen here (DeepSpeed's CPU comm op, ~40 s)
TURNS_FILE = ".memlayers-clearing-build-locks"  # what the clearing processes flock to take turns
# What each op JIT-built here is and how long its build takes (2 shared CPU cores, 2026-12), by the prefix
# of its build folder's name, for the lines a process waiting for a build prints
KNOWN_BUILDS = {
    "memlayers_cpu": "memlayers' compiled CPU ops (kernels/csrc; usually 15-35 s)",
    "deepspeed_shm_comm": "DeepSpeed's shared-memory comm op (usually 35-85 s)",
}


def build_described(name: str) -> str:
    """The op whose build folder is `name`, as a person reads it: what it is and how long it usually
    takes, from KNOWN_BUILDS; the name itself for another op."""
    return next((text for prefix, text in KNOWN_BUILDS.items() if name.startswith(prefix)), name)


def say_on_stderr(line: str) -> None:
    """How the builds speak: one line on stderr, 'memlayers: <line>' (stdout is the trainer's log and
    a tool's results; a UserWarning added a second line, the warning call's source)."""
    print(f"memlayers: {line}", file=sys.stderr, flush=True)


def extensions_root() -> Path:
    """Where torch.utils.cpp_extension builds: TORCH_EXTENSIONS_DIR, else torch's default."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def build_locks(root: Path) -> list[Path]:
    """`<root>/<op>/lock`, and `<root>/<python/cuda version>/<op>/lock` for torch's default root."""
    return sorted({*root.glob("*/lock"), *root.glob("*/*/lock")})


def clear_stale_build_locks(
    root: Path | None = None,
    max_age_s: float = MAX_AGE_S,
    say: Callable[[str], None] = say_on_stderr,
    poll_s: float = 1.0,
    ops: Collection[str] | None = None,
) -> list[Path]:
    """Wait while a build lock under `root` is younger than `max_age_s`; remove each older one.
    `ops`: only the locks of these ops (their build folders' names), the ones the caller loads;
    None: every op's. Returns the locks removed."""
    root = root if root is not None else extensions_root()
    removed: list[Path] = []
    waiting_said: set[Path] = set()
    while True:
        young = []
        for lock in build_locks(root):
            if ops is not None and lock.parent.name not in ops:
                continue
            with taking_turns(root / TURNS_FILE):
                age = _remove_if_stale(lock, max_age_s, now=lambda: filesystem_now(root / TURNS_FILE))
            if age is None:
                continue  # its build just finished, or another process removed it
            if age > max_age_s:
                removed.append(lock)
                say(
                    f"removed a stale build lock {lock} ({age / 60:.0f} min old: a build of {lock.parent.name} was "
                    "killed mid-way); the op is built again"
                )
            else:
                young.append((lock, age))
        if not young:
            return removed
        for lock, age in young:
            if lock not in waiting_said:
                waiting_said.add(lock)
                say(
                    f"waiting for another process's build of {build_described(lock.parent.name)} in {lock.parent} "
                    f"(its lock is {age:.0f} s old; removed as stale at {max_age_s:.0f} s)"
                )
        time.sleep(poll_s)


@contextlib.contextmanager
def taking_turns(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """This process's turn among those that flock `path` (created if missing): an exclusive flock,
    which the kernel releases when its holder dies, so a killed holder never blocks the next.
    `on_wait` is called once if another process holds the turn. No turns where the folder cannot
    hold the file or the filesystem has no flock (callers must stay correct without them)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:
        yield
        return
    try:
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


def filesystem_now(probe: Path) -> float:
    """Now by the clock that stamps the files beside `probe` (which must exist): its mtime, just set.
    On a network filesystem that is the server's clock, which stamped the build locks too, so a lock's
    age does not depend on how far this node's clock is from it (a node 15 min ahead saw a live build's
    lock as stale, and removed it, letting a second build run beside it). time.time() where `probe`
    cannot be touched."""
    try:
        os.utime(probe)
        return os.stat(probe).st_mtime
    except OSError:
        return time.time()


def _remove_if_stale(lock: Path, max_age_s: float, now: Callable[[], float] = time.time) -> float | None:
    """The lock's age in seconds by `now` (the clock that stamps it), having removed it if older than
    `max_age_s`; None if it is gone."""
    try:
        seen = os.stat(lock)
    except FileNotFoundError:
        return None
    age = now() - seen.st_mtime
    if age <= max_age_s:
        return age
    aside = lock.with_name(f".{lock.name}.stale-{os.getpid()}@{socket.gethostname()}-{secrets.token_hex(4)}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return None
    moved = os.stat(aside)
    if (moved.st_dev, moved.st_ino, moved.st_mtime_ns) == (seen.st_dev, seen.st_ino, seen.st_mtime_ns):
        os.unlink(aside)
        return age
    # A build took the lock between the stat and the rename: give it back, unless yet another build
    # took the free name meanwhile (then that one holds it; the moved file is its own build's to remove).
    try:
        os.link(aside, lock)
    except FileExistsError:
        pass
    except OSError:  # a filesystem without hard links: a rename, which would replace a lock taken meanwhile
        os.rename(aside, lock)
        return min(now() - moved.st_mtime, max_age_s)
    os.unlink(aside)
    return min(now() - moved.st_mtime, max_age_s)  # a live build's: waited for
