"""Checkpoint checksums: the size and CRC-32 of every file of a checkpoint, written with it
(`checksums.json`) and compared on resume, so that a file damaged after it was written (a bit
flipped on disk or in a copy, a copy cut short) is refused, naming the file, instead of being
loaded: torch's loader does not check the CRCs of its zip members, and safetensors files have
none, so such a file loaded without a word and trained on (measured: a flipped byte in the value
shard or the DeepSpeed model states resumed silently).

A guard against accidents, not tampering: whoever can change a file can change its sum too.
Both directions are collectives that read each file once in all: rank r hashes files r, r + W,
... of the checkpoint, by the list rank 0 sees. A checkpoint without `checksums.json` (written
before it existed) is not checked.
"""

from __future__ import annotations

import errno
import json
import zlib
from pathlib import Path

from pretrain.distributed import global_min, global_sums, rank0_text, text_from
from pretrain.files import atomic_write

SUMS_FILE = "checksums.json"
_BLOCK = 8 << 20


def file_crc32(path: Path) -> int:
    """CRC-32 of a file's bytes, read in 8 MiB blocks."""
    crc = 0
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_BLOCK), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _files(folder: Path) -> list[str]:
    """The checkpoint's files, relative to `folder`, sorted; the sums file itself left out."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != SUMS_FILE)


def write_checksums(folder: Path, rank: int, world_size: int) -> None:
    """Every rank calls it once all ranks have written their files into `folder`; rank 0 writes
    `folder/checksums.json`. A failed read or write raises OSError (the caller's full-disk path),
    after the collectives: a rank that fails here leaves no other waiting for it."""
    failure, listing = None, ""
    if rank == 0:
        try:
            listing = "\n".join(_files(folder))
        except OSError as err:  # the ranks are told of no file, and sum none
            failure = err
    names = [n for n in rank0_text(listing).split("\n") if n]
    mine = [0, 0] * len(names)
    for i in range(rank, len(names) if failure is None else 0, world_size):
        try:
            path = folder / names[i]
            mine[2 * i : 2 * i + 2] = [path.stat().st_size, file_crc32(path)]
        except OSError as err:
            failure = err
            break
    values = global_sums(mine)
    if failure is not None:
        raise failure
    if rank == 0:
        files = {name: {"bytes": values[2 * i], "crc32": values[2 * i + 1]} for i, name in enumerate(names)}
        atomic_write(folder / SUMS_FILE, json.dumps({"algorithm": "crc32", "files": files}, indent=1) + "\n")


def unreadable(err: OSError) -> str:
    """What a failed read of a checkpoint file (permission denied, an I/O error of a disk or a
    network mount) says: the file, the system's reason, and where the fix lies."""
    path = err.filename or "a checkpoint file"
    reason = err.strerror or str(err)
    if err.errno in (errno.EACCES, errno.EPERM):
        fix = "make it readable for the user this job runs as (chmod, or ask its owner)"
    else:
        fix = "the filesystem failed to read it: check the disk or mount on this node (dmesg), or copy the checkpoint again"
    return f"{path} cannot be read ({reason}): {fix}"


def _mismatch(folder: Path, name: str, entry: dict) -> str | None:
    """What is wrong with `folder/name` against its recorded `entry`, or None."""
    path = folder / name
    if not path.is_file():
        return f"missing file {path} (listed in {SUMS_FILE})"
    try:
        size = path.stat().st_size
        crc = file_crc32(path) if size == entry["bytes"] else None
    except OSError as err:  # on this rank's node (a permission, a mount's I/O error): an answer, not a leave
        return unreadable(err)
    if size != entry["bytes"]:
        return f"{path} holds {size} bytes, but {entry['bytes']} were written ({SUMS_FILE}): it was cut or changed"
    if crc != entry["crc32"]:
        return (
            f"{path} does not match the CRC-32 it was written with ({crc:08x}, {SUMS_FILE} says {entry['crc32']:08x}): "
            "it was damaged or changed after it was written"
        )
    return None


def _read_sums(folder: Path) -> dict | str | None:
    """The recorded sums, a message where the file is unreadable, None where there is none."""
    path = folder / SUMS_FILE
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        return {str(k): {"bytes": int(v["bytes"]), "crc32": int(v["crc32"])} for k, v in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{path} cannot be read ({type(err).__name__}: {err})"


def checksum_problem(folder: Path, rank: int = 0, world_size: int = 1, collective: bool = True) -> str | None:
    """The first file of the checkpoint `folder` that differs from its recorded size and CRC-32
    (a message naming it), or None. `collective`: every rank calls it and reads its share; all get
    the same answer. Otherwise this process reads every file."""
    sums = _read_sums(folder)
    if isinstance(sums, str) or sums is None:
        return sums
    names = sorted(sums)
    if not collective:
        rank, world_size = 0, 1
    mine = ((i, _mismatch(folder, names[i], sums[names[i]])) for i in range(rank, len(names), world_size))
    first, problem = next(((i, m) for i, m in mine if m is not None), (len(names), None))
    if not collective:
        return problem
    agreed = global_min(first)
    if agreed == len(names):
        return None
    # the message of the rank that read it: another node may read the same file otherwise (its own mount)
    return text_from(agreed % world_size, problem if agreed == first else "")
