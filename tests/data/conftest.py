"""Tiny corpora and prepared datasets shared by the data-pipeline tests."""

from __future__ import annotations

import pytest

from data_helpers import SEQ_LEN, make_documents
from pretrain.data import Tokenizer, train_tokenizer, write_dataset


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents()


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, documents) -> Tokenizer:
    return train_tokenizer(documents, tmp_path_factory.mktemp("tok") / "tok.model", vocab_size=400)


@pytest.fixture(scope="session")
def dataset(tmp_path_factory, documents, tokenizer):
    """A prepared dataset: 8-sequence shards so that 2 ranks x 2 workers have several each."""
    out = tmp_path_factory.mktemp("ds") / "data"
    write_dataset(
        tokenizer.encode_batch(documents),
        out,
        tokenizer,
        SEQ_LEN,
        val_fraction=0.2,
        seed=3,
        sequences_per_shard=8,
        rows_per_block=3,
        show_progress=False,
    )
    return out


@pytest.fixture(scope="session")
def second_dataset(tmp_path_factory, tokenizer):
    """Other documents than `dataset`, the same tokenizer: the second source of a mixture."""
    out = tmp_path_factory.mktemp("ds2") / "data"
    write_dataset(
        tokenizer.encode_batch(make_documents(60, seed=9)),
        out,
        tokenizer,
        SEQ_LEN,
        val_fraction=0.2,
        seed=5,
        sequences_per_shard=8,
        rows_per_block=3,
        show_progress=False,
    )
    return out
