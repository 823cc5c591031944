"""TF-IDF ranking of memory slots for a batch of text (Lin et al., 2025, sparse memory finetuning).

For slot i and a batch: tf(i) = c(i) / sum_j c(j) (its share of the batch's accesses),
idf(i) = log((|B| + 1) / (df(i) + 1)), with df and |B| (number of background units)
from a slot-frequency table. Whether a table belongs to the exported model it ranks for:
pretrain/slots/matching.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from pretrain.model import MemoryPlus, Transformer
from pretrain.model.names import memory_layer_name
from pretrain.slots.matching import TableMismatchError
from pretrain.slots.table import SlotTable


class RankedSlot(NamedTuple):
    slot: int
    score: float
    tokens: list[int]  # token ids at the positions that selected the slot (any head), in order


class SlotRanking(list):
    """RankedSlot entries, best first: the top of the `scoring` slots that scored above 0 (a list, so
    callers index and iterate it as before; `scoring` says how many the cut at `top` left out)."""

    def __init__(self, ranked: list[RankedSlot], scoring: int):
        super().__init__(ranked)
        self.scoring = scoring


def tfidf_scores(batch_counts: torch.Tensor, doc_freq: torch.Tensor, num_documents: int) -> torch.Tensor:
    """float64 (N,) scores: c(i)/sum_j c(j) * log((num_documents + 1) / (df(i) + 1))."""
    if batch_counts.shape != doc_freq.shape:
        raise ValueError(f"batch counts {tuple(batch_counts.shape)} and doc_freq {tuple(doc_freq.shape)} differ")
    c = batch_counts.to(torch.float64)
    total = c.sum()
    if total <= 0:
        raise ValueError("the batch has no slot accesses (empty text, or every position is padding)")
    idf = torch.log((num_documents + 1.0) / (doc_freq.to(torch.float64) + 1.0))
    return c / total * idf


def layer_slot_counts(indices: torch.Tensor, keep: torch.Tensor, num_slots: int) -> torch.Tensor:
    """int64 (num_slots,) accesses of one layer: indices (B*S, heads, k) at the positions where keep
    (B*S or (B, S)) is True."""
    flat = indices.reshape(keep.numel(), -1)[keep.reshape(-1).to(indices.device)]
    return torch.bincount(flat.reshape(-1), minlength=num_slots).cpu()


def top_tfidf_slots(counts: torch.Tensor, doc_freq: torch.Tensor, num_documents: int, top: int) -> torch.Tensor:
    """The (at most) `top` slots with the highest TF-IDF, best first (ties: lower slot first), of
    those scoring above 0: a slot the batch does not read, or one read in every background unit
    (df = |B|, idf = log 1 = 0), carries no sign of being specific to the batch, and sparse memory
    finetuning leaves it alone, so fewer than `top` (or none) may come back."""
    scores = tfidf_scores(counts, doc_freq, num_documents)
    signal = scores > 0
    scores = torch.where(signal, scores, torch.full_like(scores, -torch.inf))
    return torch.argsort(scores, descending=True, stable=True)[: min(top, int(signal.sum()))]


def memory_layer_names(model: Transformer) -> list[str]:
    """Canonical layer names for statistics and tables: 'layers.<i>' for each memory block."""
    return [memory_layer_name(i) for i, block in enumerate(model.layers) if block.is_memory]


def resolve_memory_layer(model: torch.nn.Module, layer: str) -> MemoryPlus:
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        module = None
    module = getattr(module, "ffn", module)
    if not isinstance(module, MemoryPlus):
        names = memory_layer_names(model) if isinstance(model, Transformer) else []
        raise ValueError(f"{layer!r} is not a memory layer of this model (memory layers: {names})")
    return module


@torch.no_grad()
def rank_slots(
    model: Transformer,
    token_ids: torch.Tensor,
    table: SlotTable,
    layer: str,
    top: int = 500,
    pad_id: int | None = None,
    keep: torch.Tensor | None = None,
) -> SlotRanking:
    """Run the model on token_ids ((S,) or (B, S)), count `layer`'s accesses at non-padding
    positions (token != pad_id, or where `keep`, of token_ids' shape, is True) and return the
    `top` accessed slots by TF-IDF against `table`, best first, with the number that scored above 0."""
    if layer not in table.counts:
        raise ValueError(f"layer {layer!r} is not in the table {table.path} (layers: {table.layers})")
    memory = resolve_memory_layer(model, layer)
    n = memory.n_keys**2
    if n != table.num_slots:
        raise TableMismatchError(f"model layer {layer} has {n} slots but the table {table.path} has {table.num_slots}")
    tokens = token_ids if token_ids.dim() == 2 else token_ids[None]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model(tokens.to(device))
    model.train(was_training)
    idx = memory.last_indices.reshape(tokens.numel(), -1).cpu()  # (B*S, H*k)
    flat_tokens = tokens.reshape(-1).cpu()
    if keep is not None:
        if keep.shape != token_ids.shape:
            raise ValueError(f"keep {tuple(keep.shape)} must have token_ids' shape {tuple(token_ids.shape)}")
        keep = keep.reshape(-1).cpu().bool()
    else:
        keep = torch.ones_like(flat_tokens, dtype=torch.bool) if pad_id is None else flat_tokens != pad_id
    counts = layer_slot_counts(idx, keep, n)
    scores = tfidf_scores(counts, table.doc_freq[layer], table.num_documents)
    order = top_tfidf_slots(counts, table.doc_freq[layer], table.num_documents, top)
    ranked = []
    for slot in order.tolist():
        positions = ((idx == slot).any(dim=1) & keep).nonzero().flatten()
        ranked.append(RankedSlot(slot, float(scores[slot]), flat_tokens[positions].tolist()))
    return SlotRanking(ranked, int((scores > 0).sum()))
