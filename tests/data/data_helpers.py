"""Constants and corpora shared by the data-pipeline tests (conftest.py is not importable by name)."""

import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from pretrain.data.shards import read_blocks, read_manifest
from pretrain.data.synthetic import build_fact_world

SEQ_LEN = 32


def make_documents(n: int = 80, seed: int = 0) -> list[str]:
    """Fact-world documents plus a few of very different lengths (one longer than a shard)."""
    docs = build_fact_world(max(2, n // 6), docs_per_entity=4, qa_docs_per_entity=2, seed=seed).train_documents[:n]
    rng = random.Random(seed)
    docs.insert(3, " ".join(rng.choice(docs).split()[0] for _ in range(700)))  # ~> 8 sequences of 33 tokens
    docs.insert(10, "Short.")
    return docs


def shard_rows(ds: Path, split: str = "train") -> list[list[tuple[int, bytes]]]:
    """Each shard's rows of a split, read directly: (first token's document id, the stored row's tokens)."""
    m = read_manifest(ds)
    info = m["splits"][split]
    out = []
    for shard in info["shards"]:
        rows = []
        for tok, meta in read_blocks(ds / shard["path"], m["seq_len"] + 1, m["token_dtype"], shard["sequences"]):
            first = meta[:, 0] + info["doc_id_offset"]
            rows += [(int(first[r]), tok[r].astype(np.int64).tobytes()) for r in range(len(tok))]
        assert len(rows) == shard["sequences"]
        out.append(rows)
    return out


def row_keys(batch, eos_id: int, doc_offset: int = 0) -> list[tuple[int, bytes]]:
    """The stored row behind each row of a batch, as `shard_rows` gives it (inputs + last target;
    padding is stored as EOS); `doc_offset`: a mixture's offset of the row's source, taken off."""
    last = batch.targets[:, -1:].clone()
    last[last == -100] = eos_id
    rows = torch.cat([batch.tokens, last], dim=1).numpy().astype(np.int64)
    return [(int(batch.doc_ids[r, 0]) - doc_offset, rows[r].tobytes()) for r in range(len(rows))]


def data_cfg(*sources, dir=""):
    """A data config's `dir` and `sources` as resolve_sources reads them: each source (dir, weight, name)."""
    return SimpleNamespace(dir=dir, sources=[dict(dir=str(d), weight=w, name=n) for d, w, n in sources])


def write_jsonl(path, records) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
