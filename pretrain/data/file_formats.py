"""What a corpus file is by its name, and its bytes as a stream: the --format choices, the
compression suffixes, a file's format under --format auto, and the binary stream that reads it
decompressed (.gz, .bz2, .xz through the standard library; .zst through a reader that raises on a
truncated file)."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
from pathlib import Path

from pretrain.data.errors import DataError

FORMATS = ("auto", "text", "blocks", "jsonl", "parquet")
COMPRESSED = (".gz", ".zst", ".zstd", ".bz2", ".xz")
STDLIB_STREAMS = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}  # the stdlib streams, by suffix: their tool's name


def format_of(path: Path, fmt: str) -> str:
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


def open_binary(path: Path):
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


def decompressor(path: Path) -> str | None:
    """The command-line tool that decompresses `path` (by its suffix), or None for a plain file."""
    suffix = path.suffix.lower()
    return STDLIB_STREAMS.get(suffix, "zstd" if suffix in (".zst", ".zstd") else None)
