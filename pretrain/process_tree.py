"""A process's children and descendants from Linux /proc, and their end by SIGKILL: for
helpers that must not outlive the process waiting on them (a compile-worker sidecar's
workers, a benchmark worker's own helpers)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def children_of(pid: int) -> list[int]:
    """The ids of the processes whose parent is `pid` ([] where there is no /proc)."""
    proc = Path("/proc")
    children = []
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_bytes()
        except OSError:  # ended meanwhile
            continue
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        if int(stat[stat.rindex(b")") + 2 :].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def descendants_of(pid: int) -> list[int]:
    """Children, their children, ... of `pid`, parents before their children."""
    found, todo = [], [pid]
    while todo:
        kids = children_of(todo.pop())
        found += kids
        todo += kids
    return found


def kill(pid: int) -> None:
    """SIGKILL to `pid`; one that has ended already is no error."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def kill_tree(pid: int) -> None:
    """SIGKILL to `pid` and every descendant (listed first, so none is re-parented unseen)."""
    for child in [pid, *descendants_of(pid)]:
        kill(child)


def kill_child_tree(proc: subprocess.Popen) -> None:
    """`kill_tree` for a child of this process, unless its exit has been collected already: its
    process id is free from then on, and may be another process's."""
    if proc.poll() is None:  # not collected: the id is still the child's (a zombie at worst)
        kill_tree(proc.pid)
