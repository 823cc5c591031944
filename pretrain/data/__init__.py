"""Data pipeline: corpora -> sentencepiece tokens -> packed webdataset shards -> resumable batches.

Modules: synthetic (the embedded fact world and its probes), input_files (which corpus files a
user's --input names: folders, patterns, links, archives, binary files), file_formats (a file's
format by its name, decompressed streams), text_encoding (BOMs, UTF-16, non-UTF-8 text), corpus
(streaming text, JSONL and Parquet readers: documents out of those files), tokenizer
(sentencepiece training and wrapper), shards (the shard format), prepare (tokenize, split, pack,
write), slices (prepare in slices, then merge), embedded (the cached default dataset), loader
(ShardLoader: rank/worker split, epochs, exact resume) with work_plan (the rows each reader
reads), row_cursor (reading them from the shards), loader_state (its saved state, checked on
resume) and loader_failures (a loader's failure, told to every rank), sources (the configured
datasets, checked), mixture (MixtureLoader: weighted sources, exact resume), checks (what the
trainer checks of the datasets at start-up: empty splits, missing shards, too few sequences for
its readers), inspect (what a prepared split holds: memlayers-inspect-data), errors (DataError),
bundled_text (real English text that ships with the machine).

The names below are imported from their modules when first used: the loaders import torch (~3 s),
which training a tokenizer or preparing a corpus does not need.
"""

from __future__ import annotations

from pretrain.lazy_names import lazy_names

_MODULE_OF = {
    "Batch": "loader",
    "CorpusStats": "corpus",
    "CorruptShardError": "shards",
    "DataError": "errors",
    "MixtureLoader": "mixture",
    "Probe": "synthetic",
    "ShardLoader": "loader",
    "Source": "sources",
    "Tokenizer": "tokenizer",
    "build_fact_world": "synthetic",
    "iter_documents": "corpus",
    "load_probes": "synthetic",
    "prepare_corpus": "prepare",
    "prepare_embedded_dataset": "embedded",
    "read_manifest": "shards",
    "resolve_sources": "sources",
    "train_tokenizer": "tokenizer",
    "write_dataset": "prepare",
}

__all__ = sorted(_MODULE_OF)
__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
