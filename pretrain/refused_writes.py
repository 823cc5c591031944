"""What a write the filesystem refused says: the reason in words, the space left, the fix.

The writers of a checkpoint each report a refused write their own way: Python's file objects
raise OSError with its errno, safetensors' writer (Rust) a SafetensorError whose text ends in
`(os error 28)`, and torch.save's zip writer (C++) a RuntimeError such as `[enforce fail at
inline_container.cc:672] . unexpected pos 247040 vs 246928` that names no cause at all (where it
wrote through a Python file object, the OSError it met is the RuntimeError's context). Printed as
they come, a full disk read as a crash in torch; `describe` turns any of them into one sentence
a user can act on, keeping the library's own text only as a short trailing detail.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

# How a failed write reads where it is not an OSError: torch.save's zip writer (C++) raises
# RuntimeError ("[enforce fail at inline_container.cc:672] . unexpected pos ...", "PytorchStreamWriter
# failed writing file ...", "basic_ios::clear: iostream error"), safetensors' writer (Rust) its
# SafetensorError ("Error while serializing: I/O error: No space left on device (os error 28)").
_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|iostream error|I/O error|os error \d+")
_OS_ERROR = re.compile(r"os error (\d+)")

# Below this much free space a write refused without an errno (torch's C++ writer) is taken for a
# full filesystem: a write fills what is left before the filesystem refuses the rest.
FULL_BELOW_BYTES = 1 << 20
_DETAIL_CHARS = 160


def is_write_failure(err: BaseException) -> bool:
    """True if `err`, raised by a writer (torch.save, safetensors, a file object), is the
    filesystem refusing a write rather than a fault of the code."""
    if isinstance(err, OSError):
        return True
    is_safetensors = type(err).__name__ == "SafetensorError"
    return (isinstance(err, RuntimeError) or is_safetensors) and bool(_WRITE_FAILURE.search(str(err)))


def errno_of(err: BaseException) -> int | None:
    """The errno behind `err`: its own, a Rust writer's `(os error N)`, or that of the OSError
    it was raised from or while handling; None where no writer told it."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno:
            return current.errno
        match = _OS_ERROR.search(str(current))
        if match:
            return int(match.group(1))
        current = current.__cause__ or current.__context__
    return None


def free_bytes(folder: str | Path) -> int | None:
    """Bytes an unprivileged user may still write on `folder`'s filesystem (its nearest existing
    ancestor's); None where that cannot be read."""
    where = Path(folder).absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return shutil.disk_usage(where).free
    except OSError:
        return None


def mib(size: int) -> str:
    """`size` bytes as a person reads it: 0 MiB, 36 KiB (below 1 MiB), 1.5 MiB, 12 MiB, 4,821 MiB."""
    if 0 < size < 2**20:
        return f"{size / 2**10:.0f} KiB"
    value = size / 2**20
    return f"{value:.1f} MiB" if 0 < value < 10 else f"{value:,.0f} MiB"


@dataclass(frozen=True)
class RefusedWrite:
    """A refused write in words: `reason` (what the filesystem said, with the space left there),
    `fix` (what to do, starting with a verb), `detail` (a short trailing sentence: the file, or the
    library's own text where it adds anything; or empty)."""

    reason: str
    fix: str
    detail: str = ""


def describe(err: BaseException, folder: str | Path, room: str = "", needed: int | None = None) -> RefusedWrite:
    """`err`, a write refused under `folder` (is_write_failure), in words. `room`: how to write
    elsewhere, said after the first fix (e.g. 'give train.run_dir a filesystem with room');
    `needed`: about how many bytes the write takes, said with a fix that frees space."""
    code = errno_of(err)
    free = free_bytes(folder)
    space = f"{mib(free)} free there" if free is not None else "its free space unknown"
    elsewhere = f", or {room}" if room else ""
    needs = f" (it needs about {mib(needed)})" if needed else ""
    if code is None and free is not None and free < FULL_BELOW_BYTES:
        code = errno.ENOSPC  # torch's writer drops the errno; the filesystem says what it was
    if code == errno.ENOSPC:
        reason, fix = f"its filesystem is full: {space}", f"Free space there{needs}{elsewhere}"
    elif code == errno.EDQUOT:
        reason = f"your disk quota there is used up ({space} on the filesystem)"
        fix = f"Free space within your quota (or raise it){needs}{elsewhere}"
    elif code in (errno.EACCES, errno.EPERM):
        reason, fix = "permission denied", f"Make {folder} writable for the user this job runs as{elsewhere}"
    elif code == errno.EROFS:
        reason, fix = "its filesystem is read-only", f"Remount it writable{elsewhere}"
    elif code == errno.EFBIG:
        reason, fix = "a file grew past the size limit of this process (ulimit -f)", f"Raise the limit{elsewhere}"
    elif code is not None:
        reason, fix = f"{os.strerror(code)} ({space})", f"Fix the filesystem{elsewhere}"
    else:  # torch's writer, with room left: a quota, a limit or a failing disk, it cannot tell which
        reason = f"the filesystem refused a write ({space}: a quota, a file size limit or a failing disk?)"
        fix = f"Fix the filesystem{elsewhere}"
    return RefusedWrite(reason, fix, _detail(err))


def _detail(err: BaseException) -> str:
    """The writer's own words, on one line and shortened, where they add to the reason: for an
    OSError (whose text is its errno's) only the file it names."""
    if isinstance(err, OSError):
        return f"The file: {err.filename}" if err.filename else ""
    text = " ".join(str(err).split())
    return "The writer's own words: " + (text if len(text) <= _DETAIL_CHARS else text[: _DETAIL_CHARS - 3] + "...")
