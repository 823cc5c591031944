"""Stale build locks of JIT-compiled ops (torch.utils.cpp_extension: memlayers' CPU ops, DeepSpeed's).

A process that builds an op holds `<extensions dir>/<op>/lock` while it compiles; the others
wait for that file to go. A build killed mid-way (a preempted or timed-out job, `kill -9`)
leaves the file behind, and every later process that loads the op then waits forever at start-up,
silently. `clear_stale_build_locks()` waits for a lock while it is younger than `max_age_s` (a
build takes under a minute: a live one finishes meanwhile) and removes one older than that,
saying which. Runs before anything loads an op: at trainer start and before the CPU ops load.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

MAX_AGE_S = 600.0  # ten times the longest build seen here (DeepSpeed's CPU comm op, ~40 s)


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
    say: Callable[[str], None] = print,
    poll_s: float = 1.0,
) -> list[Path]:
    """Wait while a build lock under `root` is younger than `max_age_s`; remove each older one.
    Returns the locks removed."""
    root = root if root is not None else extensions_root()
    removed: list[Path] = []
    waiting_said: set[Path] = set()
    while True:
        young = []
        for lock in build_locks(root):
            try:
                age = time.time() - lock.stat().st_mtime
            except FileNotFoundError:
                continue  # its build just finished
            if age > max_age_s:
                lock.unlink(missing_ok=True)
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
                    f"waiting for another process's build of {lock.parent.name} ({lock}, {age:.0f} s old; removed "
                    f"as stale at {max_age_s:.0f} s)"
                )
        time.sleep(poll_s)
