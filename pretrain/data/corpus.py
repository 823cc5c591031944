"""Streaming readers for real corpora: plain text, JSONL and JSONL.gz.

`iter_documents(paths, ...)` yields one string per document and never holds more than
one document (one file for `text`, one block for `blocks`, one line for JSONL) in
memory. Undecodable bytes are replaced (U+FFFD) and counted; empty documents are skipped
and counted, in a `CorpusStats` the caller passes in.
"""

from __future__ import annotations

import glob
import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from pretrain.data.errors import DataError

FORMATS = ("auto", "text", "blocks", "jsonl")


@dataclass
class CorpusStats:
    documents: int = 0
    non_utf8_documents: int = 0  # documents in which undecodable bytes were replaced
    empty_documents: int = 0  # skipped


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.non_utf8_documents += 1
        return raw.decode("utf-8", errors="replace")


def resolve_files(paths: list[str | Path]) -> list[Path]:
    """Expand directories (sorted, recursive) and glob patterns (sorted); check that every path exists."""
    if not paths:
        raise DataError("no input paths given: pass --input <file or directory> ...")
    files: list[Path] = []
    for p in map(Path, paths):
        if not p.exists() and glob.has_magic(str(p)):
            matched = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matched:
                raise DataError(f"input pattern {p} matches no file: check --input")
            files.extend(matched)
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
            if not found:
                raise DataError(f"input directory {p} holds no files: point --input at your corpus")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input path {p} does not exist: check --input")
    return files


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    return "jsonl" if name.endswith((".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")) else "text"


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _iter_blocks(fh) -> Iterator[bytes]:
    block: list[bytes] = []
    for line in fh:
        if line.strip():
            block.append(line)
        elif block:
            yield b"".join(block)
            block = []
    if block:
        yield b"".join(block)


def _iter_jsonl(path: Path, fh, text_field: str, stats: CorpusStats) -> Iterator[str]:
    for lineno, line in enumerate(fh, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(_decode(line, stats))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg}); fix or remove that line") from None
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (found {keys}); pass --text-field <name>")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{lineno}: field {text_field!r} is {type(text).__name__} {_preview(text)}, not a string; "
                f"fix or remove that line, or pass --text-field <name> of the field holding the text"
            )
        yield text


def _preview(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def iter_documents(
    paths: list[str | Path], fmt: str = "auto", text_field: str = "text", stats: CorpusStats | None = None
) -> Iterator[str]:
    """Yield non-empty documents, streamed. fmt: auto | text (a file is a document) |
    blocks (blank-line separated) | jsonl (also .gz; the document is `text_field`)."""
    if fmt not in FORMATS:
        raise DataError(f"format {fmt!r} must be one of {', '.join(FORMATS)}")
    stats = stats if stats is not None else CorpusStats()
    files = resolve_files(paths)

    def raw_docs() -> Iterator[str]:
        for path in files:
            kind = _format_of(path, fmt)
            try:
                with _open_binary(path) as fh:
                    if kind == "jsonl":
                        yield from _iter_jsonl(path, fh, text_field, stats)
                    elif kind == "blocks":
                        for block in _iter_blocks(fh):
                            yield _decode(block, stats)
                    else:
                        yield _decode(fh.read(), stats)
            except (EOFError, gzip.BadGzipFile, zlib.error) as err:
                raise DataError(
                    f"{path} is not a complete gzip file ({type(err).__name__}: {err}): re-copy or re-compress it "
                    "(`gzip -t` checks it), or drop the .gz suffix if it is not compressed"
                ) from None

    for text in raw_docs():
        if not text.strip():
            stats.empty_documents += 1
            continue
        stats.documents += 1
        yield text
