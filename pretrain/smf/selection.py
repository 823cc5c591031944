"""Which value rows a sparse-memory-finetuning step may change: TF-IDF top-t per batch.

After a forward pass, each memory layer holds the slots it read (`last_indices`). The
batch's access counts at non-padding positions are ranked by TF-IDF against the
pretraining slot table (pretrain.slots.tfidf_scores: tf = the batch's access share,
idf = log((|B| + 1) / (df + 1))), and the `top_t` accessed slots with the highest score
are trainable for that step. Memory layers that share one value table contribute the
union of their selections to it.
"""

from __future__ import annotations

import torch

from pretrain.model import Transformer
from pretrain.slots import (
    SlotTable,
    TableMismatchError,
    layer_slot_counts,
    memory_layer_names,
    top_tfidf_slots,
)


class SlotSelector:
    """Selects, per value table, the rows a step may update (see the module docstring)."""

    def __init__(self, model: Transformer, table: SlotTable, top_t: int):
        if top_t <= 0:
            raise ValueError(f"top_t={top_t} must be positive (the paper: 500 for short facts, 10,000 for documents)")
        self.model, self.table, self.top_t = model, table, top_t
        self.layer_names = memory_layer_names(model)
        if not self.layer_names:
            raise ValueError("the model has no memory layers: sparse memory finetuning needs model.memory.layers")
        missing = [n for n in self.layer_names if n not in table.counts]
        if missing:
            raise TableMismatchError(
                f"memory layers {missing} have no counts in the slot table {table.path} "
                f"(it has {table.layers}): use the table exported with this model"
            )
        num_slots = model.cfg.memory.num_slots
        if table.num_slots != num_slots:
            raise TableMismatchError(
                f"the model's memory has {num_slots} slots but the slot table {table.path} "
                f"has {table.num_slots}: use the table exported with this model"
            )

    def select(self, keep: torch.Tensor) -> dict[int, torch.Tensor]:
        """{value table index: sorted unique rows to update} from the last forward pass;
        keep (B, S) marks the positions that count (False at padding)."""
        num_slots = self.model.cfg.memory.num_slots
        shared = self.model.cfg.memory.shared_values
        chosen: dict[int, list[torch.Tensor]] = {}
        for i, (name, layer) in enumerate(zip(self.layer_names, self.model.memory_layers())):
            if layer.last_indices is None:
                raise RuntimeError("select() needs a forward pass first (memory layers hold no indices)")
            counts = layer_slot_counts(layer.last_indices, keep, num_slots)
            if counts.sum() == 0:
                continue
            rows = top_tfidf_slots(counts, self.table.doc_freq[name], self.table.num_documents, self.top_t)
            chosen.setdefault(0 if shared else i, []).append(rows)
        return {t: torch.unique(torch.cat(rows)) for t, rows in chosen.items()}
