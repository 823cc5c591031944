"""Slot access statistics: counters, reduction, background sample, table file, TF-IDF, and whether
a table belongs to an export (`matching`).

Trainer use: `SlotStatistics.begin_step` before a step's micro-batches, `update` once per
micro-batch with each memory layer's `last_indices`, the batch's doc ids and row streams,
`discard_step` when the step's update is skipped; `reduce()` at log/checkpoint time;
`save_table` next to every checkpoint. Format of the table: see pretrain/slots/table.py.
"""

from pretrain.slots.counters import SlotStatistics
from pretrain.slots.granularity import parse_granularity
from pretrain.slots.matching import (
    TableMismatchError,
    check_table_matches,
    load_export_for_tfidf,
    load_model_for_tfidf,
)
from pretrain.slots.sample import SampleData, recompute_doc_freq
from pretrain.slots.table import (
    FORMAT_VERSION,
    TABLE_FILENAME,
    SlotTable,
    find_table,
    load_table,
    model_config_hash,
    save_table,
    tokenizer_hash,
)
from pretrain.slots.tfidf import (
    RankedSlot,
    SlotRanking,
    layer_slot_counts,
    memory_layer_names,
    rank_slots,
    tfidf_scores,
    top_tfidf_slots,
)

__all__ = [
    "FORMAT_VERSION",
    "RankedSlot",
    "SampleData",
    "SlotRanking",
    "SlotStatistics",
    "SlotTable",
    "TABLE_FILENAME",
    "TableMismatchError",
    "check_table_matches",
    "find_table",
    "layer_slot_counts",
    "load_export_for_tfidf",
    "load_model_for_tfidf",
    "load_table",
    "memory_layer_names",
    "model_config_hash",
    "parse_granularity",
    "rank_slots",
    "recompute_doc_freq",
    "save_table",
    "tfidf_scores",
    "tokenizer_hash",
    "top_tfidf_slots",
]
