"""A mixture's rows carry their (source, worker) stream, and the trainer's slot statistics count
every read of a document once, as a brute force over the same batches does."""

from __future__ import annotations

import numpy as np
import torch

from data_helpers import data_cfg
from pretrain.data import ShardLoader
from pretrain.data.mixture import MixtureLoader
from pretrain.data.sources import resolve_sources
from tests.slots.slot_streams import occurrence_brute_force
from tests.train.helpers import tiny_config


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_mixture_streams_and_document_reads(dataset, second_dataset, tmp_path):
    from pretrain.build import build_slot_statistics

    workers, batch_size, seed, n = 2, 4, 3, 70  # 280 rows: each source is read more than once
    sources = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 1.0, "b")))
    cfg = tiny_config(tmp_path, tmp_path, f"data.num_workers={workers}", f"train.micro_batch={batch_size}")
    stats = build_slot_statistics(cfg, torch.device("cpu"), len(sources))
    heads, k, num_slots = cfg.model.memory.heads, cfg.model.memory.k, stats.num_slots
    batches = take(MixtureLoader(sources, batch_size, num_workers=workers, seed=seed), n)

    # independent streams: each source's own loader; its batches come from its workers in turn
    alone = [
        torch.cat(
            [b.tokens for b in take(ShardLoader(s.dir, batch_size=batch_size, num_workers=workers, seed=seed), n)]
        )
        for s in sources
    ]
    draws_rng = np.random.default_rng([seed, 0, 0x6D6978])  # the mixture's source draws, replayed
    used, seen, recorded = [0, 0], set(), []
    for batch in batches:
        streams = []
        for row, src in enumerate((draws_rng.random(batch_size) >= 0.5).astype(int)):
            assert torch.equal(batch.tokens[row], alone[src][used[src]])
            streams.append(int(src) * workers + used[src] // batch_size % workers)
            used[src] += 1
        assert batch.streams.tolist() == streams
        docs = batch.doc_ids.reshape(-1, 1, 1)
        own = torch.where(docs >= 0, docs % num_slots, 0).expand(-1, heads, 1)  # each document's own slot
        idx = torch.cat([own, torch.randint(0, num_slots, (docs.shape[0], heads, k - 1))], dim=2)
        stats.update([idx], batch.doc_ids, streams=batch.streams)  # as Trainer.forward_backward does
        recorded.append(([idx], batch.doc_ids, streams))
        seen |= {d for d in batch.doc_ids.reshape(-1).tolist() if d >= 0}

    counts, doc_freq, documents, tokens = occurrence_brute_force(recorded, num_slots, 1)
    assert stats.num_documents == documents and stats.num_tokens == tokens
    assert torch.equal(stats.counts["layers.1"], torch.tensor(counts[0]))
    assert torch.equal(stats.doc_freq["layers.1"], torch.tensor(doc_freq[0]))
    assert documents > len(seen)  # documents were read again
