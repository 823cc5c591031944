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


def _children_opened(parent: Process) -> list[Process]:
    """`parent`'s children, each opened (`Process`) while it is one: with pidfds, one whose id names
    another process by the time it is opened (the child's exit collected, the id given again) is
    left out, as is every child where `parent` itself has ended (its id may name another process,
    and its children too). The caller closes them."""
    children = [Process(pid) for pid in children_of(parent.pid)]
    # checked after the children's pidfds are open: still there now, it was there when they were listed
    alive = parent.exists()
    kept = [c for c in children if alive and (c.fd is None or parent_of(c.pid) == parent.pid)]
    for child in children:
        if child not in kept:
            child.close()
    return kept


def _kill_all(processes: list[Process]) -> None:
    """SIGKILL to each; each closed after, whatever happens."""
    try:
        for process in processes:
            process.kill()
    finally:
        for process in processes:
            process.close()


def kill_children(parent: Process) -> None:
    """SIGKILL to each child of `parent`, each only while it is one (`_children_opened`)."""
    _kill_all(_children_opened(parent))


def kill_child_tree(proc: subprocess.Popen) -> None:
    """SIGKILL to a child of this process and all its descendants, unless its exit has been collected
    already (its id is free from then on, and may be another process's). Every descendant is opened
    while it is one, parents before children, before any is killed, so none is re-parented unseen;
    with pidfds, a descendant whose id was given to another process meanwhile is never signalled
    (the ids alone were: listed, then killed, whatever they named by then)."""
    if proc.poll() is not None:  # not collected: the id is still the child's (a zombie at worst)
        return
    tree = [Process(proc.pid)]
    try:
        for process in tree:  # the list grows as it is walked: parents before their children
            tree += _children_opened(process)
    except BaseException:
        for process in tree:
            process.close()
        raise
    _kill_all(tree)
