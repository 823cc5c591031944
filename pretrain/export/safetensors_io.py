"""Safetensors files read and written without holding them in memory.

`read_header` parses a file's header and checks that the data it declares is all there
(a truncated file is caught before anything is read). `read_rows` reads a row range of
a row-major tensor with plain file reads (no mmap, so untouched pages never count
towards the process's memory). `StreamWriter` writes a file whose header is known
up front, one tensor (or row block) at a time, to a temporary name renamed on close.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from pretrain.export.errors import IncompleteFileError
from pretrain.files import discard, replace_with, temp_path_beside

DTYPES = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str | Path) -> tuple[dict, int]:
    """(header without __metadata__ but with it under "__metadata__", offset of the data) for a complete file."""
    path = Path(path)
    if not path.is_file():
        raise IncompleteFileError(f"missing file {path}")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise IncompleteFileError(f"{path} is truncated ({size} bytes, no safetensors header)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER or 8 + n > size:
            raise IncompleteFileError(
                f"{path} is truncated or not a safetensors file (header of {n} bytes, file of {size})"
            )
        try:
            header = json.loads(fh.read(n))
        except ValueError as err:
            raise IncompleteFileError(f"{path} has a corrupt safetensors header ({err})") from None
    end = max((e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        raise IncompleteFileError(f"{path} is truncated: its header declares {8 + n + end} bytes, the file has {size}")
    return header, 8 + n


def read_rows(path: Path, header: dict, data_start: int, name: str, row_start: int, row_end: int) -> torch.Tensor:
    """Rows [row_start, row_end) of tensor `name` (any rank >= 1, row-major) as a new tensor."""
    entry = header[name]
    dtype, shape = DTYPES[entry["dtype"]], entry["shape"]
    row_elems = 1
    for d in shape[1:]:
        row_elems *= d
    itemsize = torch.empty((), dtype=dtype).element_size()
    out = torch.empty((row_end - row_start, *shape[1:]), dtype=dtype)
    buffer = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
    with open(path, "rb") as fh:
        fh.seek(data_start + entry["data_offsets"][0] + row_start * row_elems * itemsize)
        if buffer is not None and fh.readinto(buffer) != buffer.nbytes:
            raise IncompleteFileError(f"{path} ended while reading rows {row_start}:{row_end} of {name}")
    return out


class StreamWriter:
    """Write tensors named and shaped in advance, in order, possibly in row blocks.

    As a context manager (`with StreamWriter(...) as writer:`) the file is closed into place when
    the block ends and discarded when it raises; else call `close()`, or `abort()` on failure."""

    def __init__(
        self,
        path: str | Path,
        specs: list[tuple[str, tuple[int, ...], torch.dtype]],
        metadata: dict[str, str] | None = None,
    ):
        self.path = Path(path)
        self.tmp = temp_path_beside(self.path)
        header, offset, self._order = {}, 0, []
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        for name, shape, dtype in specs:
            numel = 1
            for d in shape:
                numel *= d
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, nbytes, dtype))
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned
        self._fh = open(self.tmp, "wb")
        self._fh.write(struct.pack("<Q", len(blob)) + blob)
        self._index, self._written = 0, 0
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._index < len(self._order) and self._order[self._index][1] == 0:
            self._index += 1

    def write(self, chunk: torch.Tensor) -> None:
        """Append the next rows of the current tensor (a whole tensor or a block of leading rows)."""
        if self._index == len(self._order):
            raise ValueError("every declared tensor is already written")
        name, nbytes, dtype = self._order[self._index]
        if chunk.dtype != dtype:
            raise ValueError(f"{name}: chunk dtype {chunk.dtype} differs from the declared {dtype}")
        data = chunk.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy()
        if self._written + data.nbytes > nbytes:
            raise ValueError(f"{name}: more data than its declared shape holds")
        self._fh.write(data)
        self._written += data.nbytes
        if self._written == nbytes:
            self._index, self._written = self._index + 1, 0
            self._skip_empty()

    def close(self) -> Path:
        if self._index != len(self._order):
            self.abort()
            raise ValueError(f"tensor {self._order[self._index][0]} was not written completely")
        try:  # the last buffered bytes meet a full disk here, or the rename fails
            self._fh.close()
            replace_with(self.tmp, self.path)
        except BaseException:
            discard(self.tmp)
            raise
        return self.path

    def abort(self) -> None:
        try:
            self._fh.close()
        except OSError:  # flushing what is buffered meets the full disk again: the first error is the one to see
            pass
        discard(self.tmp)

    def __enter__(self) -> "StreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
