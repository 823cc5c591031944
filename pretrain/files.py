"""File helpers shared by every writer: atomic files and folders, content hashes.

Everything the framework writes (configs, manifests, checkpoints' small files, shard
folders, exports, plots) appears under its final name only when complete: it is written
under a temporary name beside it and renamed, so a crash leaves the previous version
intact. This module is the one implementation of that: `atomic_write` for a whole file or
folder, `atomic_path` when the caller writes the temporary itself, the three steps
(`temp_path_beside`, `replace_with`, `discard`) for writers that stay open across calls,
and `save_figure` for a matplotlib figure.

A temporary is named `.<name>.tmp-<pid>@<host>-<random><suffix>`: distinct between hosts that
share the filesystem (pids repeat across hosts, and across containers), and traceable to its
writer. A process killed mid-write (`kill -9`, the OOM killer, a preempted job) leaves its
temporary behind; a folder's can be as large as the folder (an export, a shard set), so each
atomic folder write first removes the temporaries of the same target whose writer ran on this
host and is gone, with a warning naming them (`remove_dead_temporaries`). Those of other hosts,
whose liveness cannot be seen from here, are left.

A rename alone survives a killed process, not a crashed node or a power cut: the filesystem may
write the rename to disk before the data it names, and the new name then holds an empty or
partial file (ext4 and XFS delay the allocation of new files' blocks for seconds). So every
commit (`replace_with`) first flushes the temporary to disk (`flush_to_disk`: each file, then
each folder, so that their entries are on disk too), renames, then flushes the parent folder
that holds the new name. Only then is the previous version deleted (`latest` and the pruning of
old checkpoints come after the folder's commit).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from pretrain.words import counted

TEMP_MARK = ".tmp-"


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _host() -> str:
    """This host's name as it goes into a temporary's name (characters outside [A-Za-z0-9._-] as _)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "unknown-host"


def temp_path_beside(path: str | Path) -> Path:
    """A fresh hidden name in `path`'s folder: `.<name>.tmp-<pid>@<host>-<random><suffix>`.

    Same folder, so the final rename stays on one filesystem; unique per writer (process,
    host and a random part), so two processes never share a temporary; the suffix is kept for
    writers that read the format from it (matplotlib's savefig). Nothing is created.
    """
    path = Path(path)
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}@{_host()}-{secrets.token_hex(4)}{path.suffix}")


_WRITER = re.compile(r"(\d+)@(.+)-[0-9a-f]{8}")  # <pid>@<host>-<random> between the mark and the suffix


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (another user's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of `path` (see `temp_path_beside`) whose writer ran on this host and
    is no longer running, warning with their names; return them (those that could not be removed are
    warned of apart, with the error). A temporary of another host, of
    a live process (a reused pid included: kept, to be safe) or named otherwise is left."""
    path = Path(path)
    prefix, host = f".{path.name}{TEMP_MARK}", _host()
    removed, kept = [], []
    try:
        siblings = list(path.parent.iterdir())
    except FileNotFoundError:
        return []
    for candidate in siblings:
        name = candidate.name
        if not (name.startswith(prefix) and name.endswith(path.suffix)):
            continue
        # The old name format `.<name>.tmp-<pid>-<random>` (before 12b8a2a) is left on purpose: it
        # names no host, and on a filesystem shared by hosts a dead pid here says nothing of the
        # writer, which may be an older checkout's live write on another node (removing its
        # temporary would fail that write at its rename). Such leftovers are removed by hand.
        writer = _WRITER.fullmatch(name[len(prefix) : len(name) - len(path.suffix)])
        if writer is None or writer.group(2) != host or pid_alive(int(writer.group(1))):
            continue
        error = discard(candidate)
        if error is None:
            removed.append(candidate)
        else:
            kept.append(f"{name} ({error.strerror}: {error.filename})")
    # stacklevel 2: the project's caller (atomic_path, the embedded build), so that a tool prints it as its own
    # `warning: ...` line (pretrain.cli.plain_warnings); 3 was contextlib's __enter__ under atomic_directory
    if removed:
        warnings.warn(
            f"memlayers: removed {counted(len(removed), 'temporary', 'temporaries')} of {path} left by "
            f"killed writers on this host ({host}): {', '.join(p.name for p in removed)}",
            stacklevel=2,
        )
    if kept:
        warnings.warn(
            f"memlayers: could not remove {counted(len(kept), 'temporary', 'temporaries')} of {path} left by "
            f"killed writers on this host ({host}), remove them by hand: {', '.join(kept)}",
            stacklevel=2,
        )
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def readable_as_umask_allows(tmp: Path) -> None:
    """Give each file under `tmp` (or `tmp` itself) the read bits a plain write would have.

    Some writers make their files private whatever the umask: safetensors' `save_file` writes
    0600, so a slot table or model file would be unreadable by the colleagues a 0644 checkpoint
    folder is shared with. Only read bits are added, and only those the umask allows. A subfolder
    that cannot be listed (EACCES, EIO) raises, naming it, as in `flush_to_disk`: its files could
    not be given their bits (Path.rglob passed over it without a word).
    """
    readable = 0o444 & ~_umask()
    files = [tmp]
    if tmp.is_dir():
        files = [Path(folder, name) for folder, _, names in os.walk(tmp, onerror=_raise) for name in names]
        files = [p for p in files if p.is_file() and not p.is_symlink()]
    for file in files:
        mode = file.stat().st_mode
        if mode & readable != readable:
            os.chmod(file, mode | readable)


# what fsync answers on a filesystem that has no way to flush (some FUSE and network mounts):
# there is nothing more to do there; any other failure (EIO, ENOSPC) means the data is not on disk
_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)  # a folder too, on Linux
    except PermissionError:
        if path.is_dir():  # one we may write into but not list (mode -wx): it cannot be opened to flush
            return
        raise
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def flush_to_disk(path: str | Path) -> None:
    """fsync `path`: a file, or a folder with every file and folder beneath it (the deepest
    first, each folder after its contents). A symbolic link is not followed. A folder that cannot be
    listed (EACCES, EIO) fails the flush: its files would stay off the disk without a word."""
    path = Path(path)
    if path.is_symlink():
        return
    if path.is_dir():
        for folder, subfolders, files in os.walk(path, topdown=False, onerror=_raise):
            for name in files:
                if not os.path.islink(os.path.join(folder, name)):
                    _fsync(Path(folder, name))
            for name in subfolders:
                if not os.path.islink(os.path.join(folder, name)):
                    _fsync(Path(folder, name))
    _fsync(path)


def _raise(err: OSError) -> None:
    raise err


def replace_with(tmp: Path, path: str | Path) -> None:
    """Move the finished `tmp` (file or folder) onto `path`, on disk before and after.

    `tmp` is flushed to disk first and the folder holding `path` after the rename (see the module's
    docstring): once this returns, a power cut leaves `path` whole, old or new, never empty.

    A file is swapped in one rename. A folder cannot replace a non-empty folder in one
    step: the old one is renamed aside to a temporary name first and removed after, so `path`
    is never a half-deleted folder (a removal in place, cut short by a kill, left one: an export
    replaced with --force missing some of its files). A crash between the two renames leaves
    `path` absent and both folders whole under temporary names, which the next atomic write of
    `path` on this host removes (`remove_dead_temporaries`).
    """
    path = Path(path)
    flush_to_disk(tmp)
    if Path(tmp).is_dir() and path.is_dir():
        old = temp_path_beside(path)
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)  # the old folder back where it was
            raise
        _fsync(path.parent)
        discard(old)
        return
    os.replace(tmp, path)
    _fsync(path.parent)


def rename_on_disk(src: str | Path, dst: str | Path) -> None:
    """Rename `src` to `dst` (a name not in use, in the same filesystem), the folder holding the new
    name flushed to disk after it (`replace_with`'s last step, for a move that commits nothing new)."""
    os.replace(src, dst)
    _fsync(Path(dst).parent)


def discard(tmp: str | Path) -> OSError | None:
    """Remove a temporary file or folder (unfinished, or a killed writer's) if it exists, as much of a
    folder as can be; the first error that kept some of it (a subfolder that cannot be listed, say), else
    None. It never raises one: in an error's cleanup, the error is the one to see."""
    tmp = Path(tmp)
    folder = tmp.is_dir() and not tmp.is_symlink()
    try:
        if folder:
            shutil.rmtree(tmp)
        else:
            tmp.unlink()
    except FileNotFoundError:  # removed meanwhile
        return None
    except OSError as err:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)  # what can still go
        return err
    return None


def file_in_the_way(path: str | Path) -> Path | None:
    """The nearest existing ancestor of `path` when it is not a folder (a file, a dangling link), or
    None. Missing parent folders are made by every write (`atomic_path`, as `mkdir -p`); a file on
    the way cannot be, and the mkdir would fail with a bare FileExistsError or NotADirectoryError only
    when the result is written, after all the work."""
    for parent in Path(path).parents:
        if parent.is_dir():
            return None
        if parent.exists() or parent.is_symlink():
            return parent
    return None


@contextmanager
def atomic_path(path: str | Path, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (an empty folder if `directory`) for the caller
    to write; on success it replaces `path`, on error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_beside(path)
    if directory:
        remove_dead_temporaries(path)
        tmp.mkdir()
    try:
        yield tmp
        readable_as_umask_allows(tmp)
        replace_with(tmp, path)
    except BaseException:
        discard(tmp)
        raise


def atomic_write(path: str | Path, content: bytes | str | Callable[[Path], object], directory: bool = False) -> Path:
    """Write `path` whole or not at all; return it.

    `content` is the file's bytes, its text, or a callable given the temporary path to
    write (e.g. `lambda tmp: torch.save(obj, tmp)`), or with `directory=True` to fill
    as a folder.
    """
    if directory and not callable(content):
        raise TypeError("atomic_write(directory=True) needs a callable that fills the folder")
    with atomic_path(path, directory) as tmp:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content)
        else:
            content(tmp)
    return Path(path)


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write the matplotlib figure `fig` to `path` atomically and close it; return `path`.

    The format is the one `path`'s suffix names, PNG without one: left to itself matplotlib
    would read it from the temporary's name, whose suffix is a random tail when `path` has
    none. A folder as `path` is refused rather than replaced.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a folder: name the image file to write, e.g. {path / 'plot.png'}")
        image_format = path.suffix[1:].lower() or "png"
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=image_format))
    finally:
        plt.close(fig)


def atomic_directory(out_dir: str | Path):
    """Context manager: an empty temporary folder beside `out_dir` that replaces it on success."""
    return atomic_path(out_dir, directory=True)
