"""The rows of one reader's pieces [shard, first row, end row], read block by block from the
shards of a ShardLoader, from a position (piece, row) onwards; under data.on_corrupt=skip the
rest of a corrupt shard is skipped and counted."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from pretrain.data.shards import CorruptShardError, read_blocks

if TYPE_CHECKING:
    from pretrain.data.loader import ShardLoader


class RowCursor:
    """Reads the rows of one consumer's pieces (shard, first row, end row) from (piece i, row j) onwards."""

    def __init__(self, loader: "ShardLoader", work: list[list[int]], i: int, j: int, stats: dict):
        self.loader, self.work, self.stats = loader, work, stats
        self.i, self.j = i, j
        self._blocks = None
        self._tok = self._meta = None
        self._off = 0
        if self.i < len(self.work):
            self.j = max(j, work[i][1])  # (0, 0) is the start of an epoch whose first piece begins later
            self._open(skip=self.j)

    def _open(self, skip: int) -> None:
        shard = self.loader.shards[self.work[self.i][0]]
        self._blocks = read_blocks(
            self.loader.root / shard["path"],
            self.loader.width,
            self.loader.token_dtype,
            shard["sequences"],
            sha256=shard.get("sha256"),
            vocab_size=self.loader.vocab_size,
            first_row=skip,
        )
        self._tok = None

    def _next_block(self) -> bool:
        """Load the next block of piece i's shard; on its end or a skipped corruption move to piece i+1."""
        try:
            self._tok, self._meta = next(self._blocks)
            self._off = 0
            return True
        except StopIteration:
            pass
        except CorruptShardError as err:
            if self.loader.on_corrupt == "error":
                raise
            # A shard cut between readers is decoded from its start by each of them. A damaged block
            # (or end) that begins before this piece's first row holds rows of the reader before,
            # which meets it too and counts it: counted here only from the piece's first row on,
            # each corrupt shard counts once per epoch over all readers.
            if err.row is None or err.row >= self.work[self.i][1]:
                self.stats["corrupt_shards_skipped"] = self.stats.get("corrupt_shards_skipped", 0) + 1
            warnings.warn(f"skipping the rest of a shard (data.on_corrupt=skip): {err}", stacklevel=2)
        self._move()
        return False

    def _move(self) -> None:
        """On to piece i+1, its shard opened at the piece's first row."""
        if self._blocks is not None:
            self._blocks.close()
        self._blocks = None
        self._tok = None
        self.i, self.j = self.i + 1, self._first(self.i + 1)
        if self.i < len(self.work):
            self._open(skip=self.j)

    def _first(self, i: int) -> int:
        return self.work[i][1] if i < len(self.work) else 0

    def position(self) -> tuple[int, int]:
        if self.i < len(self.work) and self.j >= self.work[self.i][2]:
            return self.i + 1, self._first(self.i + 1)
        return self.i, self.j

    def take(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        toks, metas, n = [], [], 0
        while n < k and self.i < len(self.work):
            shard, _, end = self.work[self.i]
            if self.j >= end:
                # a piece that ends its shard reads on to the shard's end, where read_blocks checks its sha256
                if end < self.loader.sizes[shard] or self._next_block():
                    self._move()
                continue
            if self._tok is None or self._off >= len(self._tok):
                self._next_block()
                continue
            t = min(k - n, len(self._tok) - self._off, end - self.j)
            toks.append(self._tok[self._off : self._off + t])
            metas.append(self._meta[self._off : self._off + t])
            self._off += t
            self.j += t
            n += t
        if not toks:
            return np.empty((0, self.loader.width), np.int64), np.empty((0, 2), np.int64)
        return np.concatenate(toks), np.concatenate(metas)
