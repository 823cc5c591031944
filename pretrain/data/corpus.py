r"""Streaming readers for real corpora: plain text, JSONL and Parquet; .gz, .zst, .bz2 and .xz compressed.

`iter_documents(paths, ...)` yields one string per document and never holds more than
one document (one file for `text`, one block for `blocks`, one line for JSONL) or one
record batch (Parquet, the column `text_field` only) in memory. This covers how the
public pretraining corpora ship: FineWeb and most Hugging Face datasets as Parquet,
SlimPajama as .jsonl.zst, Dolma as .json.gz. Windows line ends (CRLF) are read as "\n", as
Python's text mode reads them (the tokenizer keeps whitespace, and has no piece for a lone
"\r": each line would cost a byte-fallback token); a UTF-8 byte order mark at a file's start is
dropped, as Python's "utf-8-sig" drops it. Undecodable bytes, and JSON escapes of lone
UTF-16 surrogates ("\ud83d" without its pair), are replaced (U+FFFD) and counted; empty
(and null) documents are skipped and counted, in a `CorpusStats` the caller passes in. A
truncated or corrupt file is a `DataError` naming it, never a silently shorter corpus.

Which files are read is input_files.py's concern (resolve_files), a file's format and
decompression file_formats.py's, byte order marks and UTF-16 text_encoding.py's."""

from __future__ import annotations

import gzip
import itertools
import json
import lzma
import os
import re
import shlex
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pretrain.data.errors import DataError
from pretrain.data.file_formats import COMPRESSED, FORMATS, STDLIB_STREAMS, decompressor, format_of, open_binary
from pretrain.data.input_files import resolve_files
from pretrain.data.text_encoding import UTF8_BOM, refuse_utf16, warn_of_repaired, without_bom

PARQUET_BATCH_ROWS = 1024  # documents decoded at once from a Parquet file, at most
# ... and fewer where they are long: about this much text at once, by the row group's average (its metadata).
# A row group of 1,100 documents of 512K characters read 1024 at a time peaked at 3.3 GB, 128 at a time at 1.8.
PARQUET_BATCH_BYTES = 64 << 20
# A file read as one document (--format text) larger than this is refused: no document is that long
# (64 MiB is ~16M tokens), a corpus in one file is, and it would be one document (the tokenizer takes a
# long one in pieces: Tokenizer.cut_document).
MAX_TEXT_DOCUMENT_BYTES = 64 << 20
# A JSON Lines line is read with at most this many bytes in memory: the document in it is held to
# MAX_TEXT_DOCUMENT_BYTES of text as well, and JSON's escapes may take up to 6 bytes a character ("\u0416",
# as Python's json.dumps writes non-ASCII text by default: 3 bytes a Cyrillic character of 2 in UTF-8).
MAX_JSONL_LINE_FACTOR = 4
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class CorpusStats:
    documents: int = 0
    non_utf8_documents: int = 0  # documents in which undecodable bytes or lone surrogates were replaced
    empty_documents: int = 0  # skipped


def _decode(raw: bytes, stats: CorpusStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        stats.non_utf8_documents += 1
        return raw.decode("utf-8", errors="replace")


def _bounded_lines(fh, limit: int, too_long: Callable[[int], str]) -> Iterator[bytes]:
    """The lines of the binary stream `fh`, none held with more than `limit` + 1 bytes: a longer line (a
    file without line ends, one huge record) raises DataError(too_long(its line number)) before it is
    read whole; iterating over `fh` would read any line whole, however long."""
    for lineno in itertools.count(1):
        line = fh.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            raise DataError(too_long(lineno))
        yield line


def _iter_blocks(path: Path, fh) -> Iterator[bytes]:
    """Blank-line-separated blocks; one over MAX_TEXT_DOCUMENT_BYTES is refused as a file read whole is
    (a text without blank lines, single newlines between its paragraphs, is one block)."""

    def too_long(_lineno: int = 0) -> str:
        return (
            f"{path} holds a block of more than {MAX_TEXT_DOCUMENT_BYTES:,} bytes without a blank line, read "
            "as one document (--format blocks splits at blank lines only): split the text into documents "
            "(one per file or per JSONL line), or separate them with blank lines"
        )

    block: list[bytes] = []
    size = 0
    for line in without_bom(path, _bounded_lines(fh, MAX_TEXT_DOCUMENT_BYTES, too_long)):
        if line.strip():
            block.append(line)
            size += len(line)
            if size > MAX_TEXT_DOCUMENT_BYTES:
                raise DataError(too_long())
        elif block:
            yield b"".join(block)
            block, size = [], 0
    if block:
        yield b"".join(block)


def _too_large_record(where: str, size: str) -> str:
    return (
        f"{where}: the document holds {size} bytes of text, more than the {MAX_TEXT_DOCUMENT_BYTES:,} a document "
        "may hold (as a plain-text file; tokenizing takes several times a document's size in memory): split it "
        "into several records, or leave that record out"
    )


def _iter_jsonl(path: Path, fh, text_field: str, stats: CorpusStats) -> Iterator[str]:
    """The documents of a JSON Lines binary stream, the field `text_field` of each line's object."""
    limit = MAX_JSONL_LINE_FACTOR * MAX_TEXT_DOCUMENT_BYTES

    def too_long(lineno: int) -> str:  # the line is not read further: how much text it holds is not known
        return (
            f"{path}:{lineno}: the line is longer than {limit:,} bytes ({MAX_JSONL_LINE_FACTOR} x the "
            f"{MAX_TEXT_DOCUMENT_BYTES:,} bytes of text a document may hold, room for JSON's escapes), so it is not "
            "read whole: split its record into several, or leave it out"
        )

    lines = _bounded_lines(fh, limit, too_long)
    lines = without_bom(path, lines)
    first = True
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        repaired_before = stats.non_utf8_documents
        try:
            record = json.loads(_decode(line, stats))
        except json.JSONDecodeError as err:
            if first and line.strip()[:1] in (b"[", b"{"):
                raise DataError(_not_json_lines(path, lineno, line)) from None
            raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg}); fix or remove that line") from None
        first = False
        if isinstance(record, list):
            raise DataError(_not_json_lines(path, lineno, line))
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (found {keys}); pass --text-field <name>")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(
                f"{path}:{lineno}: field {text_field!r} is {type(text).__name__} {_preview(text)}, not a string; "
                f"fix or remove that line, or pass --text-field <name> of the field holding the text"
            )
        # JSON can escape half of a UTF-16 pair ("\\ud83d" alone): text no UTF-8 encoder accepts.
        if b"\\u" in line and _SURROGATE.search(text):
            text = _SURROGATE.sub("\ufffd", text)
            if stats.non_utf8_documents == repaired_before:  # not counted yet for bad bytes
                stats.non_utf8_documents += 1
        # the text's UTF-8 is never longer than the line (an escape is as long as its character or longer)
        if len(line) > MAX_TEXT_DOCUMENT_BYTES and (size := len(text.encode("utf-8"))) > MAX_TEXT_DOCUMENT_BYTES:
            raise DataError(_too_large_record(f"{path}:{lineno}", f"{size:,}"))
        yield text


def _not_json_lines(path: Path, lineno: int, line: bytes) -> str:
    """The error for a .json file that is one JSON document (an array of records, or records
    written over several lines) rather than JSON Lines, which is read one line at a time."""
    written = shlex.quote(path.name.split(".")[0] + ".jsonl")
    # jq reads no compressed file ("parse error: Invalid numeric literal" for a .json.gz): decompress into it
    tool, quoted = decompressor(path), shlex.quote(str(path))
    source = f"{tool} -dc {quoted} | jq -c" if tool else "jq -c"
    target = "" if tool else f" {quoted}"
    if line.strip().startswith(b"["):
        what, jq = "a JSON array", f"{source} '.[]'{target} > {written}"
    else:
        what, jq = "a JSON object written over several lines", f"{source} .{target} > {written}"
    return (
        f"{path}:{lineno}: the file is {what}, not JSON Lines (one document per line, each a JSON object "
        f"with the field holding its text): convert it, e.g. {jq}; or, if each file is one document (a "
        "folder of documentation), pass --format text"
    )


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.lower().endswith(COMPRESSED):  # a Parquet reader seeks (the footer is at the end)
        raise DataError(
            f"{path} is a compressed Parquet file, which cannot be read as a stream: decompress it first "
            "(gunzip / zstd -d); Parquet compresses its pages itself"
        )
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"{path} is not a readable Parquet file ({err}): re-copy it, or pass --format") from None
    with parquet:
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            raise DataError(f"{path}: no column {text_field!r} (found {schema.names}); pass --text-field <name>")
        kind = schema.field(text_field).type
        values = kind.value_type if pa.types.is_dictionary(kind) else kind  # dictionary-encoded text decodes too
        if not (pa.types.is_string(values) or pa.types.is_large_string(values) or pa.types.is_string_view(values)):
            raise DataError(
                f"{path}: column {text_field!r} is {kind}, not a string; "
                "pass --text-field <name> of the column holding the text"
            )
        rows = 0  # before the batch
        try:
            for batch in _parquet_batches(parquet, text_field):
                sizes = _byte_lengths(batch.column(0))
                if len(sizes) and sizes.max() > MAX_TEXT_DOCUMENT_BYTES:  # refused before it becomes Python text
                    row = int(np.argmax(sizes > MAX_TEXT_DOCUMENT_BYTES))
                    where = f"{path}: row {rows + row + 1:,} (counting from 1) of column {text_field!r}"
                    raise DataError(_too_large_record(where, f"{int(sizes[row]):,}"))
                rows += batch.num_rows
                for text in batch.column(0).to_pylist():
                    yield "" if text is None else text
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path} is a damaged Parquet file ({err}): re-copy or re-download it") from None


def _parquet_batches(parquet, text_field: str):
    """The column `text_field` of `parquet` in record batches, row group by row group, each of at most
    PARQUET_BATCH_ROWS rows and, by the row group's average row (uncompressed, from the file's metadata),
    about PARQUET_BATCH_BYTES of text."""
    meta = parquet.metadata
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        chunks = (group.column(j) for j in range(group.num_columns))
        size = next((c.total_uncompressed_size for c in chunks if c.path_in_schema == text_field), 0)
        rows = PARQUET_BATCH_ROWS if size <= 0 else PARQUET_BATCH_BYTES * group.num_rows // size
        yield from parquet.iter_batches(
            batch_size=min(max(rows, 1), PARQUET_BATCH_ROWS), row_groups=[g], columns=[text_field]
        )


def _byte_lengths(column) -> np.ndarray:
    """The UTF-8 bytes of each value of a Parquet text column's batch (0 for a null)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(column.type):  # binary_length has no kernel for these two
        column = column.dictionary_decode()
    if pa.types.is_string_view(column.type):
        column = column.cast(pa.large_string())
    return pc.binary_length(column).fill_null(0).to_numpy()


def _preview(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def iter_documents(
    paths: list[str | Path],
    fmt: str = "auto",
    text_field: str = "text",
    stats: CorpusStats | None = None,
    *,
    files: list[Path] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Yield non-empty documents, streamed. fmt: auto (from the suffix) | text (a file is a
    document) | blocks (blank-line separated) | jsonl (the document is `text_field`) | parquet
    (the column `text_field`). Files ending in .gz, .zst, .bz2 or .xz are decompressed on the fly (not Parquet).
    `files`: what resolve_files(paths) returned, for a caller passing over the corpus several times
    (listing and checking a folder of many files costs ~0.1 ms a file). `progress`: called as each
    document is yielded, with the bytes of the files read by then (as stored, compressed or not; the
    readers' buffers read ahead), out of input_bytes(files)."""
    if fmt not in FORMATS:
        raise DataError(f"format {fmt!r} must be one of {', '.join(FORMATS)}")
    stats = stats if stats is not None else CorpusStats()
    files = resolve_files(paths, fmt=fmt) if files is None else files

    repaired_before, repaired_files = stats.non_utf8_documents, []

    done = 0  # bytes of the files read whole

    def raw_docs() -> Iterator[tuple[str, int]]:
        """(document, bytes of the input read once it was)"""
        nonlocal done
        for path in files:
            yield from _read_file(path)
            done += path.stat().st_size

    def _parse(path: Path, kind: str, fh) -> Iterator[str]:
        if kind == "jsonl":
            yield from _iter_jsonl(path, fh, text_field, stats)
        elif kind == "blocks":
            for block in _iter_blocks(path, fh):
                yield _decode(block, stats)
        else:
            raw = fh.read(MAX_TEXT_DOCUMENT_BYTES + 1)
            refuse_utf16(path, raw)
            if len(raw) > MAX_TEXT_DOCUMENT_BYTES:
                raise DataError(
                    f"{path} holds more than {MAX_TEXT_DOCUMENT_BYTES:,} bytes of text, read as one "
                    "document (a plain-text file is one document): pass --format blocks to split it at "
                    "blank lines, or store one document per file or per JSONL line"
                )
            yield _decode(raw.removeprefix(UTF8_BOM), stats)

    def _read_file(path: Path) -> Iterator[tuple[str, int]]:
        kind = format_of(path, fmt)
        if kind == "parquet":  # no position within the file: each document counts its start
            for text in _iter_parquet(path, text_field):
                yield text, done
            return
        before = stats.non_utf8_documents
        try:
            with open_binary(path) as fh:
                for text in _parse(path, kind, fh):
                    yield text, done + os.lseek(fh.fileno(), 0, os.SEEK_CUR)  # the OS's: buffers read ahead
        except (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, OSError) as err:
            tool = STDLIB_STREAMS.get(path.suffix.lower())
            damaged = not isinstance(err, OSError) or isinstance(err, gzip.BadGzipFile) or "Invalid data" in str(err)
            if tool is None or not damaged:  # bz2 reports bad data as a bare OSError; others are not damage
                raise
            raise DataError(
                f"{path} is not a complete {tool} file ({type(err).__name__}: {err}): re-copy or re-compress it "
                f"(`{tool} -t` checks it), or drop the {path.suffix} suffix if it is not compressed"
            ) from None
        if stats.non_utf8_documents > before:
            repaired_files.append(path)

    for text, read in raw_docs():
        if not text.strip():
            stats.empty_documents += 1
            continue
        stats.documents += 1
        if progress is not None:
            progress(read)
        yield text.replace("\r\n", "\n") if "\r" in text else text
    if repaired_files:
        warn_of_repaired(repaired_files, stats.non_utf8_documents - repaired_before)


def check_record_files(files: list[Path], fmt: str = "auto", text_field: str = "text") -> None:
    """Read the first record of every JSON Lines and Parquet file among `files`, so that one of
    another shape (a single JSON document such as a package's .json.gz, a missing text field) is
    refused before tokenizing, not when a pass of minutes reaches it."""
    for path in files:
        if format_of(path, fmt) in ("jsonl", "parquet"):
            next(iter_documents([path], fmt, text_field, CorpusStats(), files=[path]), None)


def most_documents(files: list[Path], fmt: str = "auto") -> int | None:
    """The most documents `files` can hold when each is read whole (plain text, not --format blocks): one
    per file, the empty ones skipped; None when some file holds records or blocks, uncounted until read."""
    return len(files) if all(format_of(f, fmt) == "text" for f in files) else None


def input_bytes(files: list[Path]) -> int:
    """The bytes of the files as stored: the whole of iter_documents' `progress`."""
    return sum(f.stat().st_size for f in files)
