"""Data pipeline: corpora -> sentencepiece tokens -> packed webdataset shards -> resumable batches.

Modules: synthetic (the embedded fact world and its probes), corpus (streaming text, JSONL and
Parquet readers, compressed or not), tokenizer (sentencepiece training and wrapper), shards (the
shard format), prepare (tokenize, split, pack, write), slices (prepare in slices, then merge),
embedded (the cached default dataset), loader (ShardLoader: rank/worker split, epochs, exact
resume), sources (the configured datasets, checked), mixture (MixtureLoader: weighted sources,
exact resume), checks (what the trainer checks of the datasets at start-up: empty splits, missing
shards, too few sequences for its readers), inspect (what a prepared split holds:
memlayers-inspect-data), errors (DataError), bundled_text (real English text that ships with the
machine).
"""

from pretrain.data.corpus import CorpusStats, iter_documents
from pretrain.data.embedded import prepare_embedded_dataset
from pretrain.data.errors import DataError
from pretrain.data.loader import Batch, ShardLoader
from pretrain.data.mixture import MixtureLoader
from pretrain.data.prepare import prepare_corpus, write_dataset
from pretrain.data.shards import CorruptShardError, read_manifest
from pretrain.data.sources import Source, resolve_sources
from pretrain.data.synthetic import Probe, build_fact_world, load_probes
from pretrain.data.tokenizer import Tokenizer, train_tokenizer

__all__ = [
    "Batch",
    "CorpusStats",
    "CorruptShardError",
    "DataError",
    "MixtureLoader",
    "Probe",
    "ShardLoader",
    "Source",
    "Tokenizer",
    "build_fact_world",
    "iter_documents",
    "load_probes",
    "prepare_corpus",
    "prepare_embedded_dataset",
    "read_manifest",
    "resolve_sources",
    "train_tokenizer",
    "write_dataset",
]
