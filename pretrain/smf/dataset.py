"""The finetuning set: documents from text or JSONL, tokenized into padded batches.

Every document becomes one row "<eos> tokens..." (documents longer than the model's
context are cut into consecutive windows), right-padded; padding positions carry target
-100 and do not count as slot accesses. Batches keep file order by default, so a file
that groups a fact's paraphrases together gives batches about one fact (how the paper
batches facts); `shuffle=True` reshuffles each epoch with a seeded generator.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from pretrain.data import Tokenizer
from pretrain.data.corpus import iter_documents
from pretrain.data.errors import DataError


@dataclass
class FinetuneBatch:
    tokens: torch.Tensor  # (B, S) int64, 0 at padding
    targets: torch.Tensor  # (B, S) int64, -100 at padding
    keep: torch.Tensor  # (B, S) bool, False at padding


class FinetuneSet:
    """Tokenized finetuning rows; iterate epochs of batches with `batches()`."""

    def __init__(
        self,
        paths: list[str | Path],
        tokenizer: Tokenizer,
        max_seq_len: int,
        fmt: str = "auto",
        text_field: str = "text",
    ):
        self.rows: list[list[int]] = []
        self.num_documents = 0  # those with a token to predict; a longer one than the context gives several rows
        for text in iter_documents(list(paths), fmt=fmt, text_field=text_field):
            rows = document_rows(text, tokenizer, max_seq_len)
            self.rows += rows
            self.num_documents += bool(rows)
        if not self.rows:
            raise DataError(
                f"the finetuning set {[str(p) for p in paths]} holds no document with a token to "
                "predict: check the files (and --text-field for JSONL)"
            )

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def num_tokens(self) -> int:
        return sum(len(r) - 1 for r in self.rows)

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> Iterator[FinetuneBatch]:
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        order = list(range(len(self.rows)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield collate([self.rows[i] for i in order[start : start + batch_size]])


def document_rows(text: str, tokenizer: Tokenizer, max_seq_len: int) -> list[list[int]]:
    """The rows one document becomes: "<eos> tokens...", cut into windows of max_seq_len + 1
    tokens overlapping by one, so every token is a target once (none for a text with no token
    to predict). A row's inputs, those whose slot reads count, are all its tokens but the last."""
    ids = [tokenizer.eos_id] + tokenizer.encode(text)
    windows = (ids[start : start + max_seq_len + 1] for start in range(0, max(1, len(ids) - 1), max_seq_len))
    return [w for w in windows if len(w) >= 2]


def collate(rows: list[list[int]]) -> FinetuneBatch:
    """Right-pad rows of token ids (each >= 2 long) into inputs, next-token targets and a keep mask."""
    length = max(len(r) for r in rows) - 1
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row) - 1
        tokens[i, :n] = torch.tensor(row[:-1])
        targets[i, :n] = torch.tensor(row[1:])
    return FinetuneBatch(tokens, targets, targets != -100)
