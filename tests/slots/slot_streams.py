"""Random packed token streams with slot picks, and brute-force (pure Python) statistics.

A stream is a run of documents (unique, non-monotone ids, random lengths) packed
row-major into micro-batches of (B, S): documents straddle rows and micro-batches.
"""

from __future__ import annotations

import random
from collections import defaultdict

import torch


def make_stream(
    seed: int,
    num_batches: int,
    B: int,
    S: int,
    heads: int,
    k: int,
    num_slots: int,
    layers: int,
    first_doc_id: int,
    max_doc_len: int,
    pad_tail: int = 0,
):
    """List of (layer_indices, doc_ids) micro-batches; the last `pad_tail` tokens are padding (-1)."""
    rng = random.Random(seed)
    total = num_batches * B * S
    docs, next_id = [], first_doc_id
    while len(docs) < total:
        length = rng.randint(1, max_doc_len)
        docs.extend([next_id * 7919 % 1_000_003] * length)  # unique but not increasing
        next_id += 1
    docs = docs[:total]
    for i in range(pad_tail):
        docs[total - 1 - i] = -1
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for b in range(num_batches):
        doc_ids = torch.tensor(docs[b * B * S : (b + 1) * B * S], dtype=torch.int64).view(B, S)
        # k distinct slots per (token, head), as top-k produces; small N forces collisions
        idx = [torch.rand(B * S, heads, num_slots, generator=gen).argsort(-1)[..., :k] for _ in range(layers)]
        batches.append((idx, doc_ids))
    return batches


def units_of(granularity: str, batch_no: int, doc_ids: torch.Tensor, stream: str = "") -> list:
    B, S = doc_ids.shape
    out = []
    for r in range(B):
        for p in range(S):
            d = int(doc_ids[r, p])
            if granularity == "document":
                out.append(d)
            elif granularity == "sequence":
                out.append((stream, batch_no, r))
            else:
                out.append((stream, batch_no, r, p // int(granularity.split(":")[1])))
    return out


def brute_force(streams: dict[str, list], granularity: str, num_slots: int, layers: int):
    """counts, doc_freq (lists per layer), num_documents, num_tokens over all streams."""
    counts = [[0] * num_slots for _ in range(layers)]
    pairs = [set() for _ in range(layers)]
    units, tokens = set(), 0
    for name, batches in streams.items():
        for b, (idx, doc_ids) in enumerate(batches):
            flat_docs = doc_ids.reshape(-1).tolist()
            for t, unit in enumerate(units_of(granularity, b, doc_ids, name)):
                if flat_docs[t] < 0:
                    continue
                tokens += 1
                units.add(unit)
                for layer in range(layers):
                    for slot in idx[layer][t].reshape(-1).tolist():
                        counts[layer][slot] += 1
                        pairs[layer].add((unit, slot))
    doc_freq = []
    for layer in range(layers):
        df = defaultdict(int)
        for _, slot in pairs[layer]:
            df[slot] += 1
        doc_freq.append([df[i] for i in range(num_slots)])
    return counts, doc_freq, len(units), tokens


def occurrence_brute_force(batches, num_slots: int, layers: int):
    """Reads of documents counted by hand: counts, doc_freq (lists per layer), num_documents, num_tokens.

    `batches`: (layer_indices, doc_ids (B, S), row_streams: B hashable stream names) in the
    order read. Each stream's tokens are laid end to end (its rows in order, row-major) and
    split into occurrences, the maximal runs of equal doc id; runs of padding (< 0) are dropped.
    """
    tokens_of = defaultdict(list)  # stream -> [(doc id, picks of each layer)]
    for idx, doc_ids, row_streams in batches:
        B, S = doc_ids.shape
        for r in range(B):
            for p in range(S):
                picks = [idx[layer][r * S + p].reshape(-1).tolist() for layer in range(layers)]
                tokens_of[row_streams[r]].append((int(doc_ids[r, p]), picks))
    counts = [[0] * num_slots for _ in range(layers)]
    doc_freq = [[0] * num_slots for _ in range(layers)]
    documents = tokens = 0
    for stream_tokens in tokens_of.values():
        runs: list[tuple[int, list]] = []
        for doc, picks in stream_tokens:
            if runs and runs[-1][0] == doc:
                runs[-1][1].append(picks)
            else:
                runs.append((doc, [picks]))
        for doc, run in runs:
            if doc < 0:
                continue
            documents += 1
            tokens += len(run)
            for layer in range(layers):
                selected = set()
                for picks in run:
                    for slot in picks[layer]:
                        counts[layer][slot] += 1
                        selected.add(slot)
                for slot in selected:
                    doc_freq[layer][slot] += 1
    return counts, doc_freq, documents, tokens
