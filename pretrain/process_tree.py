"""A process's children and descendants from Linux /proc, and their end by SIGKILL: for
helpers that must not outlive the process waiting on them (a compile-worker sidecar's
workers, a benchmark worker's own helpers).

A process id is free again once the process's exit is collected, and the next process may get
it: a SIGKILL sent by id after that reaches a stranger. `Process` holds a pidfd (Linux >= 5.3),
which names the process itself, where the system has them, and falls back to the id elsewhere."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """`/proc/<pid>/stat`'s fields after the command name (state, ppid, ...), None where the
    process has ended (or there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(errors="replace")
    except OSError:
        return None
    # pid (comm) state ppid ...: comm may hold spaces and parentheses
    return stat[stat.rindex(")") + 2 :].split()


def parent_of(pid: int) -> int | None:
    """The id of `pid`'s parent, None where it has ended (or there is no /proc)."""
    fields = stat_fields(pid)
    return int(fields[1]) if fields else None


def children_of(pid: int) -> list[int]:
    """The ids of the processes whose parent is `pid` ([] where there is no /proc)."""
    proc = Path("/proc")
    entries = proc.iterdir() if proc.is_dir() else ()
    return [int(e.name) for e in entries if e.name.isdigit() and parent_of(int(e.name)) == pid]


class Process:
    """A process to signal later, through a pidfd where the system has them (Linux >= 5.3): a process
    whose exit has been collected meanwhile is then told apart from a later one given its id. Where
    there are none (older kernels, seccomp), by its id, as before. Open it while the process's exit
    is not yet collected (a child not yet waited for: `Popen.poll()` is None); close it after."""

    def __init__(self, pid: int):
        self.pid, self.fd, self.ended = pid, None, False
        try:
            self.fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.ended = True
        except (AttributeError, OSError):  # no pidfds here: by id
            pass

    def _signal(self, signum: int) -> bool:
        """Send `signum` (0: none, a check); whether the process was still there to receive it."""
        if self.ended:
            return False
        try:
            if self.fd is None:
                os.kill(self.pid, signum)
            else:
                signal.pidfd_send_signal(self.fd, signum)
        except ProcessLookupError:
            self.ended = True
        except PermissionError:  # another user's: there, not ours to signal
            pass
        return not self.ended

    def exists(self) -> bool:
        """Whether it runs, or has ended with its exit not yet collected."""
        return self._signal(0)

    def kill(self) -> None:
        """SIGKILL to it; one that has ended already is no error."""
        self._signal(signal.SIGKILL)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def kill_children(parent: Process) -> None:
    """SIGKILL to each child of `parent`. With pidfds, a child is signalled only while it is one: once
    the parent's exit has been collected its id may name another process, and its children too."""
    children = [Process(pid) for pid in children_of(parent.pid)]
    try:
        # checked after the children's pidfds are open: still there now, it was there when they were listed
        if not parent.exists():
            return
        for child in children:
            if child.fd is None or parent_of(child.pid) == parent.pid:  # by pidfd: not a later holder of the id
                child.kill()
    finally:
        for child in children:
            child.close()


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
