"""Constants and corpora shared by the data-pipeline tests (conftest.py is not importable by name)."""

import random

from pretrain.data.synthetic import build_fact_world

SEQ_LEN = 32


def make_documents(n: int = 80, seed: int = 0) -> list[str]:
    """Fact-world documents plus a few of very different lengths (one longer than a shard)."""
    docs = build_fact_world(max(2, n // 6), docs_per_entity=4, qa_docs_per_entity=2, seed=seed).train_documents[:n]
    rng = random.Random(seed)
    docs.insert(3, " ".join(rng.choice(docs).split()[0] for _ in range(700)))  # ~> 8 sequences of 33 tokens
    docs.insert(10, "Short.")
    return docs
