"""Slot access statistics: counters, reduction, background sample, table file, TF-IDF, and whether
a table belongs to an export (`matching`).

Trainer use: `SlotStatistics.begin_step` before a step's micro-batches, `update` once per
micro-batch with each memory layer's slot indices (handed over by the layer's lookup hook:
`pretrain.model.lookups.LookupRecorder`), the batch's doc ids and row streams,
`discard_step` when the step's update is skipped; `reduce()` at log/checkpoint time;
`save_table` next to every checkpoint. Format of the table: see pretrain/slots/table.py.

The names below are imported from their modules on first use, so that finding a table (`locate`)
loads no torch.
"""

from __future__ import annotations

from pretrain.lazy_names import lazy_names

# name -> the module of this package that defines it
_MODULE_OF = {
    "SlotStatistics": "counters",
    "parse_granularity": "granularity",
    "TableMismatchError": "matching",
    "check_table_matches": "matching",
    "load_export_for_tfidf": "matching",
    "load_model_for_tfidf": "matching",
    "SampleData": "sample",
    "recompute_doc_freq": "sample",
    "TABLE_FILENAME": "locate",
    "find_table": "locate",
    "FORMAT_VERSION": "table",
    "SlotTable": "table",
    "load_table": "table",
    "model_config_hash": "table",
    "save_table": "table",
    "tokenizer_hash": "table",
    "RankedSlot": "tfidf",
    "SlotRanking": "tfidf",
    "layer_slot_counts": "tfidf",
    "memory_layer_names": "tfidf",
    "rank_slots": "tfidf",
    "tfidf_scores": "tfidf",
    "top_tfidf_slots": "tfidf",
}

__all__ = sorted(_MODULE_OF)
__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
