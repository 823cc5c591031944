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
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import itertools
import json
import lzma
import os
import re
import shlex
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pretrain.data.errors import DataError

FORMATS = ("auto", "text", "blocks", "jsonl", "parquet")
COMPRESSED = (".gz", ".zst", ".zstd", ".bz2", ".xz")
_STREAMS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}  # the stdlib streams, by suffix: their tool's name
# Files no reader here takes, which were read as one document of binary garbage when named (a .tar.gz
# decompressed, then read whole, headers included): refused before any work, naming the fix.
_ARCHIVES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.zst", ".tar.bz2", ".tar.xz", ".7z", ".rar")
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
_BOM = "\ufeff".encode()
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


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


def _files_in(root: Path, broken: list[Path] | None = None, linked_folders: list[Path] | None = None) -> list[Path]:
    """The files under `root` (symbolic links to files included), sorted as Paths sort, hidden files and
    folders left out (`huggingface-cli download --local-dir` keeps its metadata under .cache/huggingface/
    beside the data); symbolic links to folders are not entered, as find, grep -r and Path.rglob do not
    (a link may lead back up: a loop), and appended to `linked_folders` (sorted), when given. As
    sorted(Path.rglob) with a filter, which this replaced: one scandir per folder, where rglob and a stat
    per file took ~60 us a file. Symbolic links that lead nowhere are appended to `broken` (sorted), when
    given."""
    found: list[tuple[str, ...]] = []
    dangling: list[tuple[str, ...]] = []
    folder_links: list[tuple[str, ...]] = []
    stack: list[tuple[str, ...]] = [()]
    while stack:
        parts = stack.pop()
        folder = os.path.join(root, *parts)
        try:
            entries = list(os.scandir(folder))
        except OSError as err:  # rglob skipped such a folder without a word: its documents went missing
            raise DataError(
                f"cannot list {folder} ({err.strerror}): make it readable, or name the files to read"
            ) from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                stack.append((*parts, entry.name))
            elif entry.is_file():  # follows a symbolic link: a broken one, or one to a folder, is no file
                found.append((*parts, entry.name))
            elif entry.is_symlink():
                if entry.is_dir():
                    folder_links.append((*parts, entry.name))
                elif not os.path.exists(entry.path):
                    dangling.append((*parts, entry.name))
    if broken is not None:
        broken += [root.joinpath(*parts) for parts in sorted(dangling)]
    if linked_folders is not None:
        linked_folders += [root.joinpath(*parts) for parts in sorted(folder_links)]
    return [root.joinpath(*parts) for parts in sorted(found)]  # Paths compare by their parts


def resolve_files(paths: list[str | Path], option: str = "--input", fmt: str = "auto") -> list[Path]:
    """Expand directories (sorted, recursive; hidden files and folders skipped) and glob patterns
    (sorted); check that every path exists. `option`: the command-line flag the paths came from,
    named in the errors; `fmt`: the --format they are read with (auto: each file's by its suffix)."""
    if not paths:
        raise DataError(f"no input paths given: pass {option} <file or directory> ...")
    files: list[Path] = []
    # each file (device, inode: a symbolic or hard link is the file it links to) -> (the argument that
    # named it first, the path it was reached by)
    named_by: dict[tuple[int, int], tuple[str, Path]] = {}
    stats: dict[Path, os.stat_result] = {}  # each file's, found once: a stat per file
    for arg, p in zip(paths, map(Path, paths)):
        before = len(files)
        if not p.exists() and glob.has_magic(str(p)):
            matched, broken = [], []
            for m in sorted(map(Path, glob.glob(str(p), recursive=True))):
                if m.is_file():
                    matched.append(m)
                elif m.is_symlink() and not m.exists():
                    broken.append(m)
            _warn_of_broken_links(broken, arg, option)
            if not matched:
                raise DataError(f"input pattern {p} matches no file: check {option}")
            matched = _without_links(matched, arg, option, stats)
            matched = _without_archives(_without_binary(matched, arg, option), arg, option, stats)
            files.extend(matched)
        elif p.is_dir():
            _refuse_prepared(p, option)
            broken: list[Path] = []
            linked_folders: list[Path] = []
            found = _files_in(p, broken, linked_folders)
            _warn_of_broken_links(broken, arg, option, p)
            _warn_of_linked_folders(linked_folders, arg, option, p)
            found = _without_links(found, arg, option, stats, relative_to=p)
            found = _without_prepared(found, arg, option, p)
            found = _without_binary(found, arg, option, relative_to=p)
            found = _without_archives(found, arg, option, stats, relative_to=p)
            for f in found:
                _refuse_unreadable(f, option)
            if fmt == "auto":  # a --format reads every file alike: no file is read otherwise than meant
                _warn_of_mixed_formats(found, arg, option, p)
            if not found:
                raise DataError(f"input directory {p} holds no files: point {option} at your corpus")
            files.extend(found)
        elif p.is_file():
            _refuse_binary(p, option)
            files.append(p)
        else:
            raise DataError(f"input path {p} does not exist: check {option}")
        for f in files[before:]:
            _refuse_unreadable(f, option)
            key = _file_key(stats[f] if f in stats else f.stat())
            if key in named_by:
                first_arg, first = named_by[key]
                raise DataError(_read_twice(f, first, first_arg, str(arg), option))
            named_by[key] = (str(arg), f)
    return files


def _file_key(stat: os.stat_result) -> tuple[int, int]:
    """A file's identity: a symbolic or hard link is the file it links to."""
    return stat.st_dev, stat.st_ino


def _without_links(
    found: list[Path], arg, option: str, stats: dict[Path, os.stat_result], relative_to: Path | None = None
) -> list[Path]:
    """`found` (the files a folder or glob pattern `arg` reached) with each file once: of the names of
    one file (symbolic or hard links, as /usr/share/doc/base-files/FAQ -> README), the first that is
    not a symbolic link is kept, the others skipped with a warning naming them. Each file's key
    stat goes into `stats`, for the caller's later checks."""
    names: dict[tuple[int, int], list[Path]] = {}
    for f in found:
        stats[f] = f.stat()
        names.setdefault(_file_key(stats[f]), []).append(f)
    if all(len(group) == 1 for group in names.values()):
        return found

    def shown(f: Path) -> str:
        return str(f.relative_to(relative_to)) if relative_to else str(f)

    kept, skipped = set(), []
    for group in names.values():
        keep = min(group, key=Path.is_symlink) if len(group) > 1 else group[0]  # the first not a symbolic link
        kept.add(keep)
        skipped += [f"{shown(f)} (= {shown(keep)})" for f in group if f is not keep]
    warnings.warn(
        f"{option} {arg}: skipped {len(skipped)} file(s) that are links to a file it reaches by another name, "
        f"so that it is read once: {', '.join(skipped[:4])}{' ...' if len(skipped) > 4 else ''}",
        stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
    )
    return [f for f in found if f in kept]


def _read_twice(path: Path, first: Path, first_arg: str, arg: str, option: str) -> str:
    """The error for one file reached by two arguments, by one name or two (a link)."""
    harm = "its documents would be read twice, some into the training and some into the validation split"
    if os.path.abspath(path) == os.path.abspath(first):
        return (
            f"{path} is named twice in {option} ({first_arg!r} and {arg!r}): {harm}; name each file once "
            "(to weight a corpus, prepare it on its own and give it a weight in data.sources)"
        )
    links = [str(p) for p in (first, path) if p.is_symlink()]
    how = (
        f"{' and '.join(links)} {'is a symbolic link' if len(links) == 1 else 'are symbolic links'}"
        if links
        else "hard links"
    )
    return (
        f"{first} and {path} are one file ({how}), reached by {option} {first_arg!r} and {arg!r}: {harm}; "
        "name each file once"
    )


def _warn_of_mixed_formats(found: list[Path], arg, option: str, root: Path) -> None:
    """A folder of record files (JSONL, Parquet) that also holds plain-text files: as a Hugging Face
    dataset downloaded with --local-dir keeps its card, README.md, beside data/*.parquet. Each text file
    is read as one more document (the card's YAML and prose among the training text): said once. A folder
    of text files with a few record files among them (/usr/share/doc: 4,128 and 66, nodejs/api/*.json.gz)
    is rather documents, of which those few are read as records: said so, with --format text."""
    kinds = {f: _format_of(f, "auto") for f in found}
    text = [f for f, kind in kinds.items() if kind == "text"]
    records = [f for f, kind in kinds.items() if kind != "text"]
    if records and len(records) < len(text):
        names = ", ".join(str(f.relative_to(root)) for f in records[:4]) + (" ..." if len(records) > 4 else "")
        warnings.warn(
            f"{option} {arg}: besides its {len(text)} plain-text files it holds {len(records)} JSONL/Parquet "
            f"file(s) ({names}), read as records (a document per line or row, from the field --text-field); if "
            "they are documents like the others, pass --format text to read every file whole",
            stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
        )
    elif text and records:
        names = ", ".join(str(f.relative_to(root)) for f in text[:4]) + (" ..." if len(text) > 4 else "")
        record = next(f for f in found if kinds[f] != "text")
        suffix = "".join(record.suffixes[-2:]) if record.suffix in COMPRESSED else record.suffix
        pattern = f"'{root}/**/*{suffix}'"
        warnings.warn(
            f"{option} {arg}: besides its JSONL/Parquet files it holds {len(text)} plain-text file(s) ({names}), "
            f"each read as one document; if they are not corpus text, name the data files alone (e.g. {pattern})",
            stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
        )


def _warn_of_broken_links(broken: list[Path], arg, option: str, root: Path | None = None) -> None:
    """Symbolic links in a folder (or matching a glob pattern) that lead nowhere (a target moved, an
    unmounted drive): they were skipped without a word, their documents missing from the dataset. Said
    once, naming them."""
    if broken:
        names = ", ".join(f"{f.relative_to(root) if root else f} -> {os.readlink(f)}" for f in broken[:4])
        warnings.warn(
            f"{option} {arg}: skipped {len(broken)} symbolic link(s) that lead to no file ({names}"
            f"{' ...' if len(broken) > 4 else ''}): restore their targets to read them, or remove the links",
            stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
        )


def _warn_of_linked_folders(links: list[Path], arg, option: str, root: Path) -> None:
    """Symbolic links to folders in a folder are not entered (_files_in). Those leading to a folder
    inside it lose nothing (/usr/share/doc holds 44, such as g++ -> cpp: its files are read there);
    those leading out of it were skipped without a word, their files missing from the corpus
    (/usr/share/doc/git/contrib/hooks -> ../../../git-core/contrib/hooks). Said once, naming them."""
    real_root = os.path.realpath(root)
    outside = [f for f in links if os.path.commonpath([real_root, os.path.realpath(f)]) != real_root]
    if outside:
        names = ", ".join(f"{f.relative_to(root)} -> {os.readlink(f)}" for f in outside[:4])
        warnings.warn(
            f"{option} {arg}: did not enter {len(outside)} symbolic link(s) to folders outside it ({names}"
            f"{' ...' if len(outside) > 4 else ''}), as find and grep -r do not: to read their files, name the "
            f"folders they lead to in {option} too",
            stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
        )


def _without_archives(
    found: list[Path], arg, option: str, stats: dict[Path, os.stat_result], relative_to: Path | None = None
) -> list[Path]:
    """`found` (the files a folder or glob pattern `arg` reached) less its archives (.zip, .tar.gz, ...),
    which no reader here opens, with a warning naming them and how to include them: /usr/share/doc holds
    two test reports as .tar.gz beside 115 MB of text, and refused the whole folder for them. Where the
    archives hold at least as many bytes as the other files (a corpus shipped as archive shards beside
    its README), the corpus is in them: refused, naming them and the fix, as a named archive is."""
    packed = [f for f in found if f.name.lower().endswith(_ARCHIVES)]
    if not packed:
        return found
    rest = [f for f in found if not f.name.lower().endswith(_ARCHIVES)]
    shown = [str(f.relative_to(relative_to)) if relative_to else str(f) for f in packed[:4]]
    names = ", ".join(shown) + (" ..." if len(packed) > 4 else "")
    packed_bytes = sum(stats[f].st_size for f in packed)
    rest_bytes = sum(stats[f].st_size for f in rest)
    fix = "extract them (e.g. tar -xf or unzip) and pass the extracted files or folder"
    if packed_bytes >= rest_bytes:
        raise DataError(
            f"{option} {arg}: {len(packed)} archive(s) ({names}) hold most of its data ({packed_bytes:,} of "
            f"{packed_bytes + rest_bytes:,} bytes), and the corpus readers cannot open an archive: {fix}"
        )
    warnings.warn(
        f"{option} {arg}: skipped {len(packed)} archive(s) ({names}; {packed_bytes:,} bytes), which the corpus "
        f"readers cannot open; to read their text, {fix} too",
        stacklevel=2,  # one place (resolve_files): shown once however many passes resolve the inputs
    )
    return rest


def _refuse_unreadable(path: Path, option: str) -> None:
    """An archive or an Arrow file among the inputs: DataError naming it and what to pass instead."""
    name = path.name.lower()
    if name.endswith(_ARCHIVES):
        raise DataError(
            f"{option}: {path} is an archive, which the corpus readers cannot open: extract it (e.g. tar -xf or "
            "unzip) and pass the extracted files or folder"
        )
    if name.endswith(".arrow"):
        raise DataError(
            f"{option}: {path} is an Arrow file (as datasets' save_to_disk writes), which the corpus readers cannot "
            "open: write the dataset as Parquet or JSONL, e.g. datasets.load_from_disk(folder).to_parquet("
            "'corpus.parquet'), and pass that"
        )


def _without_prepared(found: list[Path], arg, option: str, root: Path) -> list[Path]:
    """`found` (a folder's files) less those of datasets prepared inside it (a manifest.json with
    splits and a tokenizer hash, or an OUTPUT.slices/ folder), with a warning naming them: a dataset
    prepared from a glob of the corpus folder's files may sit there, and its manifest read as JSONL
    failed the next run over the folder."""
    prepared = {f.parent for f in found if f.name == "manifest.json" and _is_manifest(f)}
    below = len(str(root))
    prepared |= {
        root / d
        for f in found
        if ".slices" in str(f)[below:]  # a few files at most: relative_to costs ~20 us a file
        for d in f.relative_to(root).parents
        if d.name.endswith(".slices")
    }
    if not prepared:
        return found
    names = ", ".join(sorted(str(d.relative_to(root)) for d in prepared))
    warnings.warn(
        f"{option} {arg}: skipped the prepared data inside it ({names}): shards, not text; move it out of the "
        "corpus folder to silence this",
        stacklevel=2,
    )
    return [f for f in found if not any(d in f.parents for d in prepared)]


def _refuse_prepared(folder: Path, option: str) -> None:
    """A prepared dataset named as the corpus (--input data/english): its shards are no text, and it
    was skipped as prepared data inside the folder, leaving 'holds no files'. Refused naming what it is,
    how to train on it, and the corpus its manifest records."""
    manifest_path = folder / "manifest.json"
    if not (manifest_path.is_file() and _is_manifest(manifest_path)):
        return
    inputs = json.loads(manifest_path.read_bytes()).get("creation", {}).get("inputs") or []
    source = f"; it was prepared from {' '.join(map(str, inputs))}" if inputs else ""
    raise DataError(
        f"{option} {folder} is a prepared dataset (shards and a manifest.json), not corpus text{source}: "
        f"pass the corpus itself to {option}, or train on the dataset as it is with data.dir={folder}"
    )


def _is_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, OSError):
        return False
    return isinstance(manifest, dict) and "splits" in manifest and "tokenizer_sha256" in manifest


def _without_binary(found: list[Path], arg, option: str, relative_to: Path | None = None) -> list[Path]:
    """`found` (the files a folder or a glob pattern `arg` reached) less those that are not text,
    with a warning naming them: `corpus/` and `'corpus/*'` both reach the recipe's corpus/tokenizer.model."""
    binary = [f for f in found if _binary_text_file(f)]
    if binary:
        shown = [str(f.relative_to(relative_to)) if relative_to else str(f) for f in binary[:4]]
        names = ", ".join(shown) + (" ..." if len(binary) > 4 else "")
        warnings.warn(
            f"{option} {arg}: skipped {len(binary)} file(s) that are not text ({names}; a tokenizer.model beside "
            "the corpus, say)",
            stacklevel=2,  # one place (resolve_files), so it shows once however many passes resolve the inputs
        )
    return [f for f in found if f not in binary]


def _refuse_binary(path: Path, option: str) -> None:
    """A file named itself that is not text (_binary_text_file): `smf_finetune --data model.safetensors`
    trained on the bytes of the weights. Refused, naming it."""
    if _binary_text_file(path):
        raise DataError(
            f"{option} {path} is not text (a NUL byte in its first 8 KiB{', decompressed' if path.suffix.lower() in COMPRESSED else ''}, "
            "as in a model, tokenizer, image or PDF file), and would be read as one document of binary: name the "
            "text, JSONL or Parquet files to read"
        )


def _binary_text_file(path: Path) -> bool:
    """A file read as text (by its suffix) whose first 8 KiB, decompressed, hold a NUL byte, as grep
    and git tell binary files: no corpus text has one, a sentencepiece model, an image or a PDF has
    (/usr/share/doc holds 7 compressed ones, such as valgrind/valgrind_manual.pdf.gz, 1.4 MB of PDF that
    was read as a document)."""
    name = path.name.lower()
    if _format_of(path, "auto") != "text" or name.endswith(_ARCHIVES + (".arrow",)):
        return False  # archives and Arrow files are refused with their fix (_refuse_unreadable), not skipped
    try:
        with _open_binary(path) as fh:
            head = fh.read(8192)
    except (OSError, EOFError, zlib.error, lzma.LZMAError, DataError):
        return False  # a damaged compressed file is refused, naming it, when it is read
    return b"\0" in head and not head.startswith(_UTF16_BOMS)  # UTF-16 text is refused when read, not skipped


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower()
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    if name.endswith(".parquet"):
        return "parquet"
    return "jsonl" if name.endswith((".jsonl", ".json", ".ndjson")) else "text"


class _ZstdReader(io.RawIOBase):
    """A .zst file decompressed as a stream (concatenated frames too). Unlike
    `zstandard.open`, which ends quietly at a cut-off frame, it raises on a truncated file."""

    def __init__(self, path: Path):
        try:
            import zstandard
        except ImportError:
            raise DataError(f"{path}: reading .zst needs the zstandard package: pip install zstandard") from None
        self._path, self._zstd = path, zstandard
        self._fh = open(path, "rb")
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()
        self._frame_started = False
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            compressed = self._fh.read(1 << 20)
            if not compressed:
                if self._frame_started and not self._obj.eof:
                    raise DataError(
                        f"{self._path} is not a complete zstd file (it ends inside a frame): re-copy or "
                        "re-compress it (`zstd -t` checks it)"
                    )
                return 0
            self._pending = self._decompress(compressed)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self._obj.eof:  # the next frame of a multi-frame file
                self._obj = self._dctx.decompressobj()
            self._frame_started = True
            try:
                out.append(self._obj.decompress(data))
            except self._zstd.ZstdError as err:
                raise DataError(f"{self._path} is not a valid zstd file ({err}): re-copy or re-compress it") from None
            data = self._obj.unused_data if self._obj.eof else b""
        return b"".join(out)

    def fileno(self) -> int:  # the compressed file's: how far it is read (iter_documents' progress)
        return self._fh.fileno()

    def close(self) -> None:
        self._fh.close()
        super().close()


def _open_binary(path: Path):
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".bz2"):
        return bz2.open(path, "rb")
    if name.endswith(".xz"):
        return lzma.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        return io.BufferedReader(_ZstdReader(path), buffer_size=1 << 20)
    return open(path, "rb")


def _without_bom(path: Path, lines) -> Iterator[bytes]:
    """The lines of a file less the UTF-8 byte order mark that Windows editors (Notepad, Excel's
    "CSV UTF-8", PowerShell's Out-File) write at its start: decoded, it would begin the first
    document as U+FEFF (three byte-fallback tokens), and a JSONL line starting with it is no JSON."""
    lines = iter(lines)
    first = next(lines, None)
    if first is not None:
        _refuse_utf16(path, first)
        yield first.removeprefix(_BOM)
        yield from lines


def _decompressor(path: Path) -> str | None:
    """The command-line tool that decompresses `path` (by its suffix), or None for a plain file."""
    suffix = path.suffix.lower()
    return _STREAMS.get(suffix, "zstd" if suffix in (".zst", ".zstd") else None)


def _conversion(path: Path, encoding: str) -> str:
    """A shell command that re-encodes `path` from `encoding` to UTF-8 in place, through its compression: a
    converted copy beside it in an input folder would be read too (the original still refused, or read a
    second time), and iconv given a compressed file converts its compressed bytes."""
    source, temporary = shlex.quote(str(path)), shlex.quote(str(path.with_name(path.name + ".utf8")))
    tool = _decompressor(path)
    iconv = f"iconv -f {encoding} -t UTF-8"
    pipe = f"{tool} -dc {source} | {iconv} | {tool} -c" if tool else f"{iconv} {source}"
    return f"{pipe} > {temporary} && mv {temporary} {source}"


def _refuse_utf16(path: Path, head: bytes) -> None:
    """UTF-16 text (Windows PowerShell 5's `>` and Out-File write it) read as UTF-8 is every other
    byte NUL and each line cut inside a character: refused, with the conversion."""
    if head.startswith(_UTF16_BOMS):
        raise DataError(
            f"{path} is UTF-16 text (it starts with a UTF-16 byte order mark); the corpus readers take UTF-8: "
            f"convert it in place, e.g. {_conversion(path, 'UTF-16')}"
        )


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
    for line in _without_bom(path, _bounded_lines(fh, MAX_TEXT_DOCUMENT_BYTES, too_long)):
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
    lines = _without_bom(path, lines)
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
    tool, quoted = _decompressor(path), shlex.quote(str(path))
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
            _refuse_utf16(path, raw)
            if len(raw) > MAX_TEXT_DOCUMENT_BYTES:
                raise DataError(
                    f"{path} holds more than {MAX_TEXT_DOCUMENT_BYTES:,} bytes of text, read as one "
                    "document (a plain-text file is one document): pass --format blocks to split it at "
                    "blank lines, or store one document per file or per JSONL line"
                )
            yield _decode(raw.removeprefix(_BOM), stats)

    def _read_file(path: Path) -> Iterator[tuple[str, int]]:
        kind = _format_of(path, fmt)
        if kind == "parquet":  # no position within the file: each document counts its start
            for text in _iter_parquet(path, text_field):
                yield text, done
            return
        before = stats.non_utf8_documents
        try:
            with _open_binary(path) as fh:
                for text in _parse(path, kind, fh):
                    yield text, done + os.lseek(fh.fileno(), 0, os.SEEK_CUR)  # the OS's: buffers read ahead
        except (EOFError, gzip.BadGzipFile, zlib.error, lzma.LZMAError, OSError) as err:
            tool = _STREAMS.get(path.suffix.lower())
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
        _warn_of_repaired(repaired_files, stats.non_utf8_documents - repaired_before)


def check_record_files(files: list[Path], fmt: str = "auto", text_field: str = "text") -> None:
    """Read the first record of every JSON Lines and Parquet file among `files`, so that one of
    another shape (a single JSON document such as a package's .json.gz, a missing text field) is
    refused before tokenizing, not when a pass of minutes reaches it."""
    for path in files:
        if _format_of(path, fmt) in ("jsonl", "parquet"):
            next(iter_documents([path], fmt, text_field, CorpusStats(), files=[path]), None)


def most_documents(files: list[Path], fmt: str = "auto") -> int | None:
    """The most documents `files` can hold when each is read whole (plain text, not --format blocks): one
    per file, the empty ones skipped; None when some file holds records or blocks, uncounted until read."""
    return len(files) if all(_format_of(f, fmt) == "text" for f in files) else None


def input_bytes(files: list[Path]) -> int:
    """The bytes of the files as stored: the whole of iter_documents' `progress`."""
    return sum(f.stat().st_size for f in files)


def _warn_of_repaired(files: list[Path], documents: int) -> None:
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
