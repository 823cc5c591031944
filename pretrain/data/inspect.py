"""What a prepared split holds, read back from its shards: the numbers to check a corpus by before
training on it, and the first rows decoded as the model will see them.

`inspect_split(dataset_dir, split)` streams every shard once (checked as the loader checks it)
and counts: tokens and padding, documents and their lengths in tokens (EOS included), the share
of byte-fallback tokens (sentencepiece spells characters its vocabulary lacks as bytes: a high
share means the tokenizer was trained on other text, e.g. another language), and the most
frequent tokens. `decoded_rows` shows the first rows with each document boundary marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pretrain.data.errors import DataError
from pretrain.data.shards import read_blocks, read_manifest, row_doc_ids
from pretrain.data.tokenizer import Tokenizer

BYTE_FALLBACK_WARNING = 0.01  # above this share of byte tokens the tokenizer hardly covers the text
SHORT_DOCUMENT = 16  # tokens, EOS included


@dataclass
class SplitReport:
    split: str
    sequences: int
    seq_len: int
    tokens: int  # valid tokens (EOS included, padding not)
    padding: int
    documents: int
    length_percentiles: dict[str, float]  # p10/p50/p90/max of document lengths in tokens
    mean_length: float
    short_documents: int  # under SHORT_DOCUMENT tokens
    byte_fallback_share: float
    top_tokens: list[tuple[str, int]] = field(default_factory=list)  # (piece, count)
    document_lengths: np.ndarray | None = None  # per document, in order (for plots and tests)

    def warnings(self) -> list[str]:
        out = []
        if self.byte_fallback_share > BYTE_FALLBACK_WARNING:
            out.append(
                f"{100 * self.byte_fallback_share:.1f}% of the tokens are byte fallbacks: the tokenizer hardly "
                "covers this text (trained on other text or another language?); train one on this corpus "
                "(tools/train_tokenizer.py) or a sample of the whole mixture"
            )
        if self.documents and self.short_documents / self.documents > 0.5:
            out.append(
                f"{self.short_documents} of {self.documents} documents are shorter than {SHORT_DOCUMENT} tokens: "
                "is --text-field the document's text, and is the text split into documents as intended "
                "(--format blocks splits plain text at blank lines)?"
            )
        return out


def _split_entry(manifest: dict, split: str, root: Path) -> dict:
    splits = manifest.get("splits", {})
    with_shards = sorted(s for s, entry in splits.items() if entry.get("shards"))
    if split in splits and not splits[split].get("shards"):
        raise DataError(
            f"{root}'s {split!r} split is empty (prepared with --val-fraction {manifest.get('val_fraction')}): "
            f"inspect {' or '.join(repr(s) for s in with_shards)} (--split)"
        )
    if split not in splits:
        raise DataError(f"{root} has no {split!r} split (it has {with_shards}): pass --split {with_shards[0]}")
    return splits[split]


def _blocks(root: Path, manifest: dict, split: str):
    width = int(manifest["seq_len"]) + 1
    for shard in _split_entry(manifest, split, root)["shards"]:
        yield from read_blocks(
            root / shard["path"],
            width,
            manifest["token_dtype"],
            int(shard["sequences"]),
            sha256=shard.get("sha256"),
            vocab_size=int(manifest["vocab_size"]),
        )


def inspect_split(dataset_dir: str | Path, split: str = "train", top: int = 20) -> SplitReport:
    root = Path(dataset_dir)
    manifest = read_manifest(root)
    tokenizer = Tokenizer(root / "tokenizer.model")
    vocab = int(manifest["vocab_size"])
    is_byte = np.array([tokenizer._sp.IsByte(i) for i in range(vocab)], dtype=bool)
    token_counts = np.zeros(vocab, dtype=np.int64)
    doc_lengths = np.zeros(0, dtype=np.int64)
    sequences = padding = 0
    for tokens, meta in _blocks(root, manifest, split):
        ids = row_doc_ids(tokens, meta[:, 0], meta[:, 1], int(manifest["eos_id"]))
        valid = ids >= 0
        sequences += len(tokens)
        padding += int((~valid).sum())
        token_counts += np.bincount(tokens[valid], minlength=vocab)
        # Count from the block's first document: a block spans few documents, however high their ids.
        first = int(ids[valid].min())
        lengths = np.bincount(ids[valid] - first)
        end = first + len(lengths)
        if end > len(doc_lengths):  # grown by doubling, so copies stay linear in the split's documents
            doc_lengths = np.pad(doc_lengths, (0, max(end, 2 * len(doc_lengths)) - len(doc_lengths)))
        doc_lengths[first:end] += lengths
    doc_lengths = doc_lengths[doc_lengths > 0]
    total = int(token_counts.sum())
    order = np.argsort(-token_counts, kind="stable")[:top]
    pieces = [(tokenizer._sp.IdToPiece(int(i)), int(token_counts[i])) for i in order if token_counts[i]]
    q = np.percentile(doc_lengths, [10, 50, 90]) if len(doc_lengths) else np.zeros(3)
    return SplitReport(
        split=split,
        sequences=sequences,
        seq_len=int(manifest["seq_len"]),
        tokens=total,
        padding=padding,
        documents=len(doc_lengths),
        length_percentiles={
            "p10": float(q[0]),
            "p50": float(q[1]),
            "p90": float(q[2]),
            "max": float(doc_lengths.max(initial=0)),
        },
        mean_length=float(doc_lengths.mean()) if len(doc_lengths) else 0.0,
        short_documents=int((doc_lengths < SHORT_DOCUMENT).sum()),
        byte_fallback_share=float(token_counts[is_byte].sum() / total) if total else 0.0,
        top_tokens=pieces,
        document_lengths=doc_lengths,
    )


def decoded_rows(dataset_dir: str | Path, split: str = "train", rows: int = 2, marker: str = " ‖ ") -> list[str]:
    """The first `rows` rows of `split` as text, `marker` where a document ends (after its EOS).
    Each row is decoded alone, so a word cut at a row's end shows without its leading space."""
    root = Path(dataset_dir)
    manifest = read_manifest(root)
    tokenizer = Tokenizer(root / "tokenizer.model")
    out: list[str] = []
    for tokens, meta in _blocks(root, manifest, split):
        ids = row_doc_ids(tokens, meta[:, 0], meta[:, 1], int(manifest["eos_id"]))
        for row, row_ids in zip(tokens, ids):
            valid = row_ids >= 0
            pieces = []
            for doc in dict.fromkeys(row_ids[valid].tolist()):  # documents in order of appearance
                part = row[valid & (row_ids == doc)]
                ends = part[-1] == int(manifest["eos_id"])
                pieces.append(tokenizer.decode(part[:-1] if ends else part) + (marker if ends else ""))
            out.append("".join(pieces))
            if len(out) == rows:
                return out
    return out
