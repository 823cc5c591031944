"""The corpus text's encoding: UTF-8 expected; a UTF-8 byte order mark dropped from a file's first
line, UTF-16 text refused, and text that was not UTF-8 (its bad bytes replaced) warned of once a
pass is over, each with the iconv command that converts the file in place."""

from __future__ import annotations

import shlex
import warnings
from pathlib import Path
from typing import Iterator

from pretrain.data.errors import DataError
from pretrain.data.file_formats import decompressor

UTF8_BOM = "\ufeff".encode()
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def without_bom(path: Path, lines) -> Iterator[bytes]:
    """The lines of a file less the UTF-8 byte order mark that Windows editors (Notepad, Excel's
    "CSV UTF-8", PowerShell's Out-File) write at its start: decoded, it would begin the first
    document as U+FEFF (three byte-fallback tokens), and a JSONL line starting with it is no JSON."""
    lines = iter(lines)
    first = next(lines, None)
    if first is not None:
        refuse_utf16(path, first)
        yield first.removeprefix(UTF8_BOM)
        yield from lines


def _conversion(path: Path, encoding: str) -> str:
    """A shell command that re-encodes `path` from `encoding` to UTF-8 in place, through its compression: a
    converted copy beside it in an input folder would be read too (the original still refused, or read a
    second time), and iconv given a compressed file converts its compressed bytes."""
    source, temporary = shlex.quote(str(path)), shlex.quote(str(path.with_name(path.name + ".utf8")))
    tool = decompressor(path)
    iconv = f"iconv -f {encoding} -t UTF-8"
    pipe = f"{tool} -dc {source} | {iconv} | {tool} -c" if tool else f"{iconv} {source}"
    return f"{pipe} > {temporary} && mv {temporary} {source}"


def refuse_utf16(path: Path, head: bytes) -> None:
    """UTF-16 text (Windows PowerShell 5's `>` and Out-File write it) read as UTF-8 is every other
    byte NUL and each line cut inside a character: refused, with the conversion."""
    if head.startswith(UTF16_BOMS):
        raise DataError(
            f"{path} is UTF-16 text (it starts with a UTF-16 byte order mark); the corpus readers take UTF-8: "
            f"convert it in place, e.g. {_conversion(path, 'UTF-16')}"
        )


def warn_of_repaired(files: list[Path], documents: int) -> None:
    """Said once a pass is over: text that was not UTF-8 was kept with U+FFFD in place of each bad byte,
    which the counts alone (the manifest's stats) left unseen: a Latin-1 file (/usr/share/doc/ed/AUTHORS:
    'Fran\\xe7ois') lost every accented letter without a word."""
    first = files[0]
    names = ", ".join(map(str, files[:3])) + (" ..." if len(files) > 3 else "")
    warnings.warn(
        f"{documents} document(s) in {len(files)} file(s) ({names}) held text that is not UTF-8, each bad byte "
        "replaced by U+FFFD: text in another encoding (Latin-1 or Windows-1252, say) loses its accented letters "
        f"so; convert such a file in place, e.g. {_conversion(first, 'latin1')}",
        stacklevel=1,  # this line: one warning however many passes (tokenizer sample, tokenizing) read the file
    )
