"""Background sample: reservoir properties, stored data, and df recomputation vs brute force."""

from __future__ import annotations

import pytest
import torch

from pretrain.slots import SlotStatistics, recompute_doc_freq
from pretrain.slots.sample import reservoir_slot
from slot_streams import brute_force, make_stream

N, H, K, B, S = 16, 2, 3, 2, 6


def test_reservoir_keeps_each_item_with_probability_capacity_over_n():
    n, capacity, seeds = 20, 5, 3000
    kept = [0] * n
    for seed in range(seeds):
        reservoir = [-1] * capacity
        for item in range(n):
            j = reservoir_slot(seed, item, capacity)
            if j >= 0:
                reservoir[j] = item
        for item in reservoir:
            kept[item] += 1
    expected = capacity / n
    sd = (expected * (1 - expected) / seeds) ** 0.5
    for count in kept:
        assert abs(count / seeds - expected) < 5 * sd


def collect(seed: int, batches, capacity: int = 3) -> SlotStatistics:
    stats = SlotStatistics(N, ["m"], granularity="document", sample_batches=capacity, seed=seed)
    for idx, doc_ids in batches:
        stats.update(idx, doc_ids)
    return stats


def test_sample_holds_the_chosen_micro_batches_and_is_deterministic():
    batches = make_stream(0, 9, B, S, H, K, N, 1, first_doc_id=0, max_doc_len=8)
    data = collect(11, batches).sample_data()
    assert data.indices["m"].dtype == torch.int32 and len(data.batch_index) == 3
    for j, item in enumerate(data.batch_index.tolist()):
        assert torch.equal(data.indices["m"][j].long(), batches[item][0][0])
        assert torch.equal(data.doc_ids[j], batches[item][1])
    assert torch.equal(collect(11, batches).sample_data().batch_index, data.batch_index)
    others = {tuple(collect(s, batches).sample_data().batch_index.sort().values.tolist()) for s in range(12, 20)}
    assert len(others) > 1  # the seed matters


@pytest.mark.parametrize("granularity", ["batch", "document", "sequence", "chunk:4"])
def test_recompute_doc_freq_matches_brute_force(granularity):
    batches = make_stream(1, 9, B, S, H, K, N, 1, first_doc_id=0, max_doc_len=8, pad_tail=0)
    data = collect(3, batches, capacity=4).sample_data()
    chosen = [batches[i] for i in data.batch_index.tolist()]
    df, units = recompute_doc_freq(data, "m", granularity, N)
    if granularity == "batch":
        want = [sum(1 for idx, _ in chosen if slot in set(idx[0].reshape(-1).tolist())) for slot in range(N)]
        assert df.tolist() == want and units == len(chosen)
    else:
        # brute_force numbers units per (stream, batch position) — here, one "stream" per sampled entry
        streams = {f"s{j}": [b] for j, b in enumerate(chosen)}
        _, doc_freq, num_units, _ = brute_force(streams, granularity, N, 1)
        assert df.tolist() == doc_freq[0] and units == num_units


@pytest.mark.parametrize("rows_after", [1, 4], ids=["smaller", "larger"])
def test_sample_goes_on_after_the_micro_batch_changes_on_resume(rows_after):
    """train.micro_batch changed on resume (the data layout re-planned, as after an out-of-memory
    error): the sample goes on, entries of fewer rows padded with doc id -1, and document
    frequencies recomputed from it are those of the micro-batches it holds (brute force)."""
    before = make_stream(4, 5, B, S, H, K, N, 1, first_doc_id=0, max_doc_len=8)
    after = make_stream(5, 40, rows_after, S, H, K, N, 1, first_doc_id=500, max_doc_len=8)
    first = collect(2, before, capacity=3)
    stats = SlotStatistics(N, ["m"], granularity="document", sample_batches=3, seed=2)
    stats.load_resharded([first.state_dict()])
    for idx, doc_ids in after:
        stats.update(idx, doc_ids)  # raised ValueError (another micro-batch shape) once one was sampled
    data = stats.sample_data()
    items = data.batch_index.tolist()
    assert any(i >= len(before) for i in items)  # an entry of the new shape was sampled
    rows = max(B, rows_after)
    chosen = [before[i] if i < len(before) else after[i - len(before)] for i in items]
    for j, (idx, doc_ids) in enumerate(chosen):
        n = doc_ids.shape[0]
        assert data.doc_ids[j].shape == (rows, S)
        assert torch.equal(data.doc_ids[j, :n], doc_ids) and bool((data.doc_ids[j, n:] == -1).all())
        assert torch.equal(data.indices["m"][j, : n * S].long(), idx[0])
    for granularity in ("document", "sequence", "chunk:4", "batch"):
        df, units = recompute_doc_freq(data, "m", granularity, N)
        if granularity == "batch":
            want = [sum(1 for idx, _ in chosen if slot in set(idx[0].reshape(-1).tolist())) for slot in range(N)]
            assert df.tolist() == want and units == len(chosen)
            continue
        _, doc_freq, num_units, _ = brute_force({f"s{j}": [b] for j, b in enumerate(chosen)}, granularity, N, 1)
        assert df.tolist() == doc_freq[0] and units == num_units, granularity
