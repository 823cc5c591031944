"""The order in which this process flushes files to disk and renames them: os.fsync by the path its
descriptor names (/proc/self/fd), os.replace and os.rename by their absolute paths. Used to check
that a write is on disk before the rename that commits it (pretrain.files.replace_with)."""

from __future__ import annotations

import os
from pathlib import Path


class SyscallLog:
    """os.fsync, os.replace and os.rename of this process, in order, as (call, path[, target])."""

    def __init__(self, monkeypatch):
        self.events: list[tuple] = []
        real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

        def fsync(fd):
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
            return real_fsync(fd)

        def replace(src, dst, **kwargs):
            self.events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
            return real_replace(src, dst, **kwargs)

        def rename(src, dst, **kwargs):
            self.events.append(("rename", os.path.abspath(src), os.path.abspath(dst)))
            return real_rename(src, dst, **kwargs)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        monkeypatch.setattr(os, "rename", rename)

    def rename_onto(self, target: Path) -> int:
        """The index of the (last) rename onto `target`."""
        hits = [i for i, e in enumerate(self.events) if e[0] == "rename" and e[2] == str(target)]
        assert hits, f"no rename onto {target}"
        return hits[-1]

    def synced(self, start: int, stop: int) -> set[str]:
        return {e[1] for e in self.events[start:stop] if e[0] == "fsync"}
