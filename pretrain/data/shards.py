"""The shard format: packing token streams into webdataset tar shards, and reading them back.

A split is a list of tar shards. A shard holds blocks of up to `rows_per_block` packed
sequences of `seq_len + 1` tokens; each block is three tar members sharing a key:

  <key>.json    {"rows": n, "crc32": crc of tokens+meta}
  <key>.tokens  n x (seq_len+1) tokens, little-endian uint16 (vocab <= 65536) or uint32
  <key>.meta    n x 2 little-endian int64: [doc index of the row's first token, valid tokens]

Documents are numbered consecutively within a split and end with EOS, so a row's
per-token document ids follow from its first doc index and its EOS positions
(`row_doc_ids`); adding the split's `doc_id_offset` (manifest) makes them unique over
the dataset (train documents first, then val). Only the last row of a split is padded (with EOS
tokens beyond `valid`, doc id -1). Tar members have fixed mtime/uid/mode, so the same
input gives byte-identical shards. Files are written under a temporary name, then renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from pretrain.data.errors import DataError
from pretrain.files import atomic_write, file_sha256, replace_with, temp_path_beside

FORMAT = "memlayers-shards-v2"


class CorruptShardError(DataError):
    """A shard could not be read; the message names the file and the byte offset. `row`: the shard
    row the damaged block (or the damaged end) begins at, where known."""

    def __init__(self, message: str, row: int | None = None):
        super().__init__(message)
        self.row = row


def token_dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def row_doc_ids(tokens: np.ndarray, first_doc: np.ndarray, valid: np.ndarray, eos_id: int) -> np.ndarray:
    """Per-token document ids (int64, -1 on padding) of rows `tokens` (n, width)."""
    is_eos = tokens == eos_id
    before = np.cumsum(is_eos, axis=1, dtype=np.int64) - is_eos  # EOS strictly before each position
    ids = first_doc[:, None] + before
    ids[np.arange(tokens.shape[1])[None, :] >= valid[:, None]] = -1
    return ids


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """Packs documents (token ids + EOS) into rows and rows into shards of one split."""

    def __init__(
        self,
        root: Path,
        split: str,
        seq_len: int,
        eos_id: int,
        token_dtype: str,
        sequences_per_shard: int,
        rows_per_block: int = 256,
    ):
        if sequences_per_shard <= 0 or rows_per_block <= 0:
            raise DataError(
                f"sequences_per_shard={sequences_per_shard} and rows_per_block={rows_per_block} must be > 0"
            )
        self.root, self.split, self.width, self.eos_id = root, split, seq_len + 1, eos_id
        self.dtype = np.dtype(token_dtype).newbyteorder("<")
        self.sequences_per_shard, self.rows_per_block = sequences_per_shard, rows_per_block
        (root / split).mkdir(parents=True, exist_ok=True)
        self.shards: list[dict] = []
        self.documents = self.tokens = 0
        self._pending_tokens: list[np.ndarray] = []
        self._pending_docs: list[np.ndarray] = []
        self._pending = 0
        self._tar: tarfile.TarFile | None = None
        self._shard_rows = self._shard_tokens = self._blocks = 0
        self._block_tokens: list[np.ndarray] = []
        self._block_meta: list[np.ndarray] = []
        self._block_rows = 0

    def add(self, ids: np.ndarray | list[int]) -> None:
        """Append one document: its ids, then EOS. A long one goes in by a block's tokens at a time: whole,
        a document of 30M tokens held 16 bytes a token (tokens and document ids as int64), then as much
        again concatenated (a 60 MiB document: 1.2 GB resident)."""
        doc_id = self.documents
        length = len(ids) + 1
        block = self.rows_per_block * self.width
        for start in range(0, length, block):
            tokens = np.empty(min(block, length - start), dtype=np.int64)
            ids_here = ids[start : start + len(tokens)]  # one fewer in the last part: EOS ends it
            tokens[: len(ids_here)] = ids_here
            if start + len(tokens) == length:
                tokens[-1] = self.eos_id
            self._pending_tokens.append(tokens)
            self._pending_docs.append(np.full(len(tokens), doc_id, dtype=np.int64))
            self._pending += len(tokens)
            if self._pending >= block:
                self._cut_rows(final=False)
        self.documents += 1
        self.tokens += length

    def close(self) -> dict:
        """Flush (padding the last row), close the last shard; return the split's manifest entry."""
        self._cut_rows(final=True)
        self._flush_block()
        self._close_shard()
        return {
            "shards": self.shards,
            "sequences": sum(s["sequences"] for s in self.shards),
            "tokens": self.tokens,
            "documents": self.documents,
        }

    def _cut_rows(self, final: bool) -> None:
        if not self._pending:
            return
        toks, docs = np.concatenate(self._pending_tokens), np.concatenate(self._pending_docs)
        n_full = len(toks) // self.width
        cut = n_full * self.width
        if n_full:
            rows = toks[:cut].reshape(n_full, self.width)
            meta = np.stack([docs[: cut : self.width], np.full(n_full, self.width, dtype=np.int64)], axis=1)
            self._emit(rows, meta)
        rest_t, rest_d = toks[cut:], docs[cut:]
        self._pending_tokens, self._pending_docs, self._pending = [rest_t], [rest_d], len(rest_t)
        if final and len(rest_t):
            row = np.full((1, self.width), self.eos_id, dtype=np.int64)
            row[0, : len(rest_t)] = rest_t
            self._emit(row, np.array([[rest_d[0], len(rest_t)]], dtype=np.int64))
            self._pending_tokens, self._pending_docs, self._pending = [], [], 0

    def _emit(self, rows: np.ndarray, meta: np.ndarray) -> None:
        i = 0
        while i < len(rows):
            if self._tar is None:
                self._open_shard()
            room = min(self.rows_per_block - self._block_rows, self.sequences_per_shard - self._shard_rows)
            take = min(room, len(rows) - i)
            self._block_tokens.append(rows[i : i + take])
            self._block_meta.append(meta[i : i + take])
            self._block_rows += take
            self._shard_rows += take
            self._shard_tokens += int(meta[i : i + take, 1].sum())
            i += take
            if self._block_rows == self.rows_per_block or self._shard_rows == self.sequences_per_shard:
                self._flush_block()
            if self._shard_rows == self.sequences_per_shard:
                self._close_shard()

    def _open_shard(self) -> None:
        name = f"{self.split}/shard-{len(self.shards):06d}.tar"
        self._path = self.root / name
        self._tmp = temp_path_beside(self._path)
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._name = name
        self._shard_rows = self._shard_tokens = self._blocks = 0

    def _flush_block(self) -> None:
        if not self._block_rows:
            return
        tokens = np.concatenate(self._block_tokens).astype(self.dtype).tobytes()
        meta = np.concatenate(self._block_meta).astype("<i8").tobytes()
        key = f"{self._blocks:06d}"
        header = {"rows": self._block_rows, "crc32": zlib.crc32(meta, zlib.crc32(tokens))}
        _add_member(self._tar, key + ".json", json.dumps(header, sort_keys=True).encode())
        _add_member(self._tar, key + ".tokens", tokens)
        _add_member(self._tar, key + ".meta", meta)
        self._blocks += 1
        self._block_tokens, self._block_meta, self._block_rows = [], [], 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        replace_with(self._tmp, self._path)
        self.shards.append(
            {
                "path": self._name,
                "sequences": self._shard_rows,
                "tokens": self._shard_tokens,
                "bytes": self._path.stat().st_size,  # compared at the trainer's start-up (data/checks.py)
                "sha256": file_sha256(self._path),
            }
        )


class _CountingReader:
    """A read-only file wrapper that remembers how far it has read (for error offsets) and
    hashes what it read (to compare with the manifest's sha256 at the end)."""

    def __init__(self, fh: BinaryIO):
        self.fh, self.offset = fh, 0
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.offset += len(data)
        self.digest.update(data)
        return data

    def rest_digest(self) -> str:
        """sha256 of the whole file: what was read plus what remains (tar padding)."""
        for _block in iter(lambda: self.read(1 << 20), b""):
            pass
        return self.digest.hexdigest()


def _tar_members(stream: BinaryIO) -> Iterator[dict]:
    """{"fname", "data"} of each regular file in the tar `stream`, in order, read sequentially (a
    tarfile stream keeps no index of the members passed). webdataset's tar_file_iterator did this, and
    importing the webdataset package imports torch (~3 s measured with -X importtime), which a tool
    that only reads shards (memlayers-inspect-data) does not need."""
    tar = tarfile.open(fileobj=stream, mode="r|*")
    for info in tar:
        if info.isreg():
            yield {"fname": info.name, "data": tar.extractfile(info).read()}
        tar.members = []


def read_blocks(
    path: Path,
    width: int,
    token_dtype: str,
    expected_rows: int,
    *,
    sha256: str | None = None,
    vocab_size: int | None = None,
    first_row: int = 0,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (tokens (n, width) int64, meta (n, 2) int64) per block of one shard, from row
    `first_row` on (the block holding it cut to start there).

    Any unreadable, inconsistent or missing part raises CorruptShardError naming the
    shard and the byte offset reached; so do token ids >= `vocab_size` and, once the whole
    shard is read, bytes whose sha256 differs from the manifest's `sha256`. The blocks before
    `first_row` are read and checked all the same (their bytes go into the sha256, their crc32
    and token ids are checked: a reader starting mid-shard stops at the same damage as one
    starting at row 0), only not converted to int64 nor yielded.
    """
    dtype = np.dtype(token_dtype).newbyteorder("<")
    rows_seen = at = 0  # rows in the blocks read; the row the block being read begins at
    try:
        fh = open(path, "rb")
    except OSError as err:
        raise CorruptShardError(
            f"shard {path} cannot be opened ({err}): re-create it with tools/prepare_data.py", row=0
        ) from None
    reader = _CountingReader(fh)

    def corrupt(why: str) -> CorruptShardError:
        return CorruptShardError(f"corrupt shard {path} at byte offset {reader.offset}: {why}", row=at)

    with fh:
        members = _tar_members(reader)
        while True:
            at = rows_seen
            try:
                parts = [next(members, None) for _ in range(3)]
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                raise corrupt(f"{type(err).__name__}: {err}") from None
            if parts[0] is None:
                break
            if any(p is None for p in parts):
                raise corrupt("a block is incomplete (truncated)")
            names = [p["fname"] for p in parts]
            key = names[0].split(".", 1)[0]
            if names != [key + ".json", key + ".tokens", key + ".meta"]:
                raise corrupt(f"unexpected members {names}")
            try:
                header = json.loads(parts[0]["data"])
                n = int(header["rows"])
            except (ValueError, KeyError, TypeError):
                raise corrupt(f"bad block header {parts[0]['data'][:80]!r}") from None
            tok_bytes, meta_bytes = parts[1]["data"], parts[2]["data"]
            if len(tok_bytes) != n * width * dtype.itemsize or len(meta_bytes) != n * 16:
                raise corrupt(f"block {key} sizes do not match {n} rows of {width} tokens")
            if zlib.crc32(meta_bytes, zlib.crc32(tok_bytes)) != header.get("crc32"):
                raise corrupt(f"block {key} checksum mismatch")
            rows_seen += n
            tokens = np.frombuffer(tok_bytes, dtype=dtype).reshape(n, width)
            if vocab_size is not None and n and int(tokens.max()) >= vocab_size:
                raise corrupt(
                    f"block {key} holds token id {int(tokens.max())} >= the dataset's vocab_size "
                    f"{vocab_size} (tokenized with another tokenizer?): re-create it with tools/prepare_data.py"
                )
            if rows_seen > first_row:
                cut = max(first_row - at, 0)
                yield tokens[cut:].astype(np.int64), np.frombuffer(meta_bytes, dtype="<i8").reshape(n, 2)[cut:]
        if rows_seen == expected_rows and sha256 is not None and reader.rest_digest() != sha256:
            size = reader.offset
            why = (  # tarfile writes whole records: a cut in the end padding still reads every block
                f"it is cut short ({size} bytes, not a whole number of {tarfile.RECORDSIZE}-byte tar records; "
                "an interrupted copy?): re-copy it from where the dataset was prepared"
                if size % tarfile.RECORDSIZE
                else "it is damaged or was written by another preparation: re-copy it from where the dataset "
                "was prepared, or re-create the dataset with tools/prepare_data.py instead of mixing shards"
            )
            raise CorruptShardError(
                f"shard {path} is not the file its manifest.json lists (sha256 {reader.digest.hexdigest()[:12]}, "
                f"manifest {sha256[:12]}): {why}",
                row=rows_seen,
            )
    if rows_seen != expected_rows:
        raise corrupt(f"holds {rows_seen} sequences, the manifest says {expected_rows} (truncated?)")


def write_manifest(root: Path, manifest: dict) -> None:
    atomic_write(root / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def read_manifest(root: str | Path) -> dict:
    root = Path(root)
    path = root / "manifest.json"
    if root.is_file():
        raise DataError(
            f"{root} is a file, not a prepared dataset folder: prepare it with tools/prepare_data.py "
            f"--input {root} --output <folder> and pass that folder"
        )
    if not root.is_dir():  # read by tools too (--data, DIR): the trainer's data.dir is not the fix to name
        from pretrain.data.sources import _nearest_dataset

        near = _nearest_dataset(root)
        raise DataError(
            f"dataset directory {root} does not exist: "
            + (f"did you mean {near}? Or " if near else "")
            + f"prepare it with tools/prepare_data.py --input <corpus> --output {root}"
        )
    if not path.is_file():
        raise DataError(f"{path} is missing: {root} is not a prepared dataset (run tools/prepare_data.py)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as err:
        raise DataError(f"{path} is not valid JSON ({err}); re-create the dataset") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; re-create the dataset")
    return manifest
