"""Units of "document frequency": which tokens form one unit for df(i).

df(i) counts the units in which slot i was selected at least once. The unit matters:
at pretraining batch sizes (millions of tokens x heads x k picks per batch) almost
every slot is hit in every batch, so batch-level presence is ~1 for all slots and the
IDF term carries no information. Finer units (documents, sequences, fixed chunks)
separate slots that serve many contexts (function words, formatting) from slots that
serve few (a fact about one entity), which is what TF-IDF needs.

`unit_ids` maps a micro-batch's token positions to unit ids, on the device, with fixed
shapes (no host synchronisation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Granularity:
    kind: str  # document | sequence | chunk
    chunk: int = 0

    @property
    def name(self) -> str:
        return f"chunk:{self.chunk}" if self.kind == "chunk" else self.kind


def parse_granularity(text: str) -> Granularity:
    """'document' | 'sequence' | 'chunk:<n>' -> Granularity; a clear error otherwise."""
    if text in ("document", "sequence"):
        return Granularity(text)
    if text.startswith("chunk:") and text[6:].isdigit() and int(text[6:]) > 0:
        return Granularity("chunk", int(text[6:]))
    raise ValueError(
        f"slot statistics granularity {text!r} must be document, sequence or chunk:<n_tokens> "
        f"(config key slots.granularity, e.g. chunk:64)"
    )


def unit_ids(granularity: Granularity, doc_ids: torch.Tensor) -> torch.Tensor:
    """Per-token unit id (T = B*S,), int64, in [0, T); non-decreasing in row-major order.

    document: the flat position where the token's run of equal doc ids starts (a
    document split over rows of one micro-batch, row-major, is one run, hence one unit).
    sequence: the row. chunk:n: row * ceil(S/n) + position // n.
    """
    B, S = doc_ids.shape
    T = B * S
    pos = torch.arange(T, device=doc_ids.device)
    if granularity.kind == "document":
        flat = doc_ids.reshape(T)
        change = torch.ones(T, dtype=torch.bool, device=doc_ids.device)
        change[1:] = flat[1:] != flat[:-1]
        return torch.where(change, pos, torch.zeros_like(pos)).cummax(0).values
    if granularity.kind == "sequence":
        return pos // S
    per_row = -(-S // granularity.chunk)
    return (pos // S) * per_row + (pos % S) // granularity.chunk
