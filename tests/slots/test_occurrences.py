"""Document frequencies count reads of documents (occurrences), against a brute force.

An occurrence is a maximal run of equal doc ids in one stream (a DataLoader worker of a
data source). Streams are given per row (`update(..., streams=...)`, as a mixture of
sources delivers them) or, without ids, are the micro-batch index modulo `streams`
(round robin). Documents are read again (a small pool of ids), span rows and micro-batches,
and are followed by padding now and then.
"""

from __future__ import annotations

import io
import random

import pytest
import torch

from pretrain.slots import SlotStatistics
from pretrain.slots.sample import reservoir_slot
from slot_streams import occurrence_brute_force

pytestmark = pytest.mark.usefixtures("counting_path")  # each test with both counting paths (conftest.py)

N, H, K, B, S, LAYERS = 32, 2, 2, 3, 5, 2
NAMES = ["layers.0", "layers.2"]


def reread_batches(seed: int, num_batches: int, num_streams: int, per_row: bool, pool: int = 6):
    """(layer_indices, doc_ids, row streams) micro-batches, each row the next row of its stream.

    A stream packs documents drawn from ids 0..pool-1 (the same ids in every stream: read
    again and again) of 1..12 tokens; after a document its row is padded to the end with
    probability 0.15. Random picks lie in [0, N/2); one pick per (token, head) is the
    document's own slot in [N/2, N), so some slots are selected by one document only."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    pending = [[] for _ in range(num_streams)]  # each stream's tokens not yet in a row

    def next_row(stream: int) -> list[int]:
        tokens = pending[stream]
        while len(tokens) < S:
            tokens.extend([rng.randrange(pool)] * rng.randint(1, 12))
            if rng.random() < 0.15:
                tokens.extend([-1] * (-len(tokens) % S))
        row, pending[stream] = tokens[:S], tokens[S:]
        return row

    batches = []
    for t in range(num_batches):
        streams = [rng.randrange(num_streams) if per_row else t % num_streams for _ in range(B)]
        doc_ids = torch.tensor([next_row(s) for s in streams], dtype=torch.int64)
        flat = doc_ids.reshape(-1, 1, 1)
        idx = []
        for layer in range(LAYERS):
            picks = torch.randint(0, N // 2, (B * S, H, K), generator=gen)
            own = N // 2 + (flat * 5 + layer) % (N // 2)
            picks[..., :1] = torch.where(flat >= 0, own, picks[..., :1])
            idx.append(picks)
        batches.append((idx, doc_ids, streams))
    return batches


def feed(stats: SlotStatistics, batches, per_row: bool) -> None:
    for idx, doc_ids, streams in batches:
        stats.update(idx, doc_ids, streams=torch.tensor(streams, dtype=torch.int64) if per_row else None)


def assert_matches(stats: SlotStatistics, batches) -> None:
    counts, doc_freq, documents, tokens = occurrence_brute_force(batches, N, LAYERS)
    assert stats.num_documents == documents and stats.num_tokens == tokens
    for layer, name in enumerate(NAMES):
        assert torch.equal(stats.counts[name], torch.tensor(counts[layer]))
        assert torch.equal(stats.doc_freq[name], torch.tensor(doc_freq[layer]))


def roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def tagged(batches, tag: str):
    """The same batches with their streams renamed: the brute force starts every stream afresh."""
    return [(idx, doc_ids, [(tag, s) for s in streams]) for idx, doc_ids, streams in batches]


MODES = [(1, False), (3, False), (4, True)]  # (streams, per-row ids): round robin or a mixture's rows


def test_document_read_three_times_counts_three_times():
    """One micro-batch [[7, 7, 8, 8]] read 3 times; doc 7 selects slots {0, 1}, doc 8 {0, 2}."""
    stats = SlotStatistics(4, ["a"], "document")
    idx = torch.tensor([[[0, 1]], [[0, 1]], [[0, 2]], [[0, 2]]])
    batches = [([idx], torch.tensor([[7, 7, 8, 8]]), [0])] * 3
    for i, doc_ids, _ in batches:
        stats.update(i, doc_ids)
    assert stats.num_documents == 6
    assert stats.doc_freq["a"].tolist() == [6, 3, 3, 0]
    _, doc_freq, documents, _ = occurrence_brute_force(batches, 4, 1)
    assert (documents, doc_freq[0]) == (6, [6, 3, 3, 0])


def test_tail_document_again_later_in_the_micro_batch_is_a_new_read():
    """Doc 5 ends micro-batch 1 and goes on at the start of 2; its later run in 2 is another read."""
    stats = SlotStatistics(4, ["a"], "document")
    batches = [
        ([torch.zeros(4, 1, 1, dtype=torch.int64)], torch.tensor(d), [0]) for d in ([[3, 5, 5, 5]], [[5, 6, 5, 5]])
    ]
    for idx, doc_ids, _ in batches:
        stats.update(idx, doc_ids)
    assert stats.num_documents == 4 == occurrence_brute_force(batches, 4, 1)[2]
    assert stats.doc_freq["a"].tolist() == [4, 0, 0, 0]


@pytest.mark.parametrize("num_streams,per_row", MODES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rereads_match_brute_force(num_streams, per_row, seed):
    batches = reread_batches(seed, 40, num_streams, per_row)
    stats = SlotStatistics(N, NAMES, "document", streams=num_streams)
    feed(stats, batches, per_row)
    assert_matches(stats, batches)
    assert stats.num_documents > 6  # documents were read again


@pytest.mark.parametrize("num_streams,per_row", MODES)
def test_resume_midway_is_exact(num_streams, per_row):
    batches = reread_batches(7, 30, num_streams, per_row)
    kwargs = dict(granularity="document", streams=num_streams)
    straight = SlotStatistics(N, NAMES, **kwargs)
    feed(straight, batches, per_row)
    for cut in (1, 13, 29):
        first = SlotStatistics(N, NAMES, **kwargs)
        feed(first, batches[:cut], per_row)
        resumed = SlotStatistics(N, NAMES, **kwargs)
        resumed.load_state_dict(roundtrip(first.state_dict()))
        feed(resumed, batches[cut:], per_row)
        a, b = straight.state_dict(), resumed.state_dict()
        assert a.keys() == b.keys() and a["meta"] == b["meta"]
        assert all(torch.equal(a[k], b[k]) for k in a if k != "meta")
        assert_matches(resumed, batches)


def as_format_1(sd: dict) -> dict:
    """A state as format 1 wrote it: doc ids in `last_doc`, no occurrence counters."""
    old = {k.replace(".last_occurrence", ".last_doc"): v for k, v in sd.items() if k != "next_occurrence"}
    old["meta"] = {**sd["meta"], "format": "slot_statistics/1"}
    return old


@pytest.mark.parametrize("change", ["format_1", "more_streams"])
def test_open_occurrences_start_afresh_on_an_older_state_or_other_streams(change):
    """Counts and totals are kept; every document in flight counts once more where it goes on."""
    before, after = reread_batches(3, 15, 2, True), reread_batches(4, 15, 3 if change == "more_streams" else 2, True)
    first = SlotStatistics(N, NAMES, "document", streams=2)
    feed(first, before, True)
    sd = roundtrip(first.state_dict())
    resumed = SlotStatistics(N, NAMES, "document", streams=3 if change == "more_streams" else 2)
    resumed.load_state_dict(as_format_1(sd) if change == "format_1" else sd)
    feed(resumed, after, True)
    assert_matches(resumed, tagged(before, "before") + tagged(after, "after"))


def test_load_resharded_sums_and_goes_on():
    parts = [reread_batches(seed, 10, 2, True) for seed in (5, 6)]
    states = []
    for part in parts:
        stats = SlotStatistics(N, NAMES, "document", streams=2)
        feed(stats, part, True)
        states.append(roundtrip(stats.state_dict()))
    states[1] = as_format_1(states[1])
    merged = SlotStatistics(N, NAMES, "document", streams=4)
    merged.load_resharded(states)
    rest = reread_batches(8, 10, 4, True)
    feed(merged, rest, True)
    assert_matches(merged, tagged(parts[0], "r0") + tagged(parts[1], "r1") + tagged(rest, "after"))


@pytest.mark.parametrize("granularity", ["sequence", "chunk:2"])
def test_stream_ids_do_not_change_other_granularities(granularity):
    batches = reread_batches(9, 12, 4, True)
    with_ids, without = (SlotStatistics(N, NAMES, granularity, streams=4) for _ in range(2))
    feed(with_ids, batches, True)
    feed(without, batches, False)
    a, b = with_ids.state_dict(), without.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != "meta")


def test_bad_stream_ids_are_refused():
    stats = SlotStatistics(N, NAMES, "document", streams=2)
    idx = [torch.zeros(B * S, H, K, dtype=torch.int64)] * 2
    doc_ids = torch.zeros(B, S, dtype=torch.int64)
    with pytest.raises(ValueError, match="one per row"):
        stats.update(idx, doc_ids, streams=torch.zeros(B + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        stats.update(idx, doc_ids, streams=torch.tensor([0, 1, 2]))
    assert stats.micro_batches == 0


@pytest.mark.parametrize("seed", [0, 6])  # 0: kept entries overwritten and put back; 6: an entry empty again
@pytest.mark.parametrize("num_streams,per_row", MODES)
def test_a_skipped_step_is_taken_back(num_streams, per_row, seed):
    """Steps of 2 micro-batches, steps 1, 4 and 5 skipped (a non-finite loss: discard_step).
    Counts, document frequencies and totals are the brute force over the applied steps'
    micro-batches alone (a document read across a skipped step stays one occurrence), and the
    background sample holds what a reservoir offered only those micro-batches would keep."""
    batches = reread_batches(11, 24, num_streams, per_row)
    skipped, capacity = {1, 4, 5}, 3
    stats = SlotStatistics(N, NAMES, "document", streams=num_streams, sample_batches=capacity, seed=seed)
    for step in range(12):
        stats.begin_step()
        feed(stats, batches[2 * step : 2 * step + 2], per_row)
        if step in skipped:
            stats.discard_step()
    assert_matches(stats, [b for item, b in enumerate(batches) if item // 2 not in skipped])
    assert stats.micro_batches == 24  # the index goes on: streams and sample choices keep the loaders' order

    reservoir, offered_all = {}, {}  # the reservoir of the applied micro-batches; of all of them
    for item in range(len(batches)):
        j = reservoir_slot(seed, item, capacity)
        if j >= 0:
            offered_all[j] = item
            if item // 2 not in skipped:
                reservoir[j] = item
    assert reservoir != offered_all  # skipped micro-batches would have stayed in the sample
    sample = stats.sample_data()
    assert sample.batch_index.tolist() == [reservoir[j] for j in sorted(reservoir)]
    for entry, item in enumerate(sample.batch_index.tolist()):
        idx, doc_ids, _ = batches[item]
        assert torch.equal(sample.doc_ids[entry], doc_ids)
        for layer, name in enumerate(NAMES):
            assert torch.equal(sample.indices[name][entry], idx[layer].to(torch.int32))


def test_discard_step_needs_begin_step():
    with pytest.raises(RuntimeError, match="begin_step"):
        SlotStatistics(N, NAMES, "document").discard_step()


def empty_batches(streams: int):
    """Micro-batches without a token to count: no rows, rows of length 0, every token padding."""
    no_picks = lambda T: [torch.zeros(T, H, K, dtype=torch.int64) for _ in range(LAYERS)]  # noqa: E731
    rows = list(range(min(B, streams)))
    return [
        (no_picks(0), torch.zeros(0, S, dtype=torch.int64), []),
        (no_picks(0), torch.zeros(len(rows), 0, dtype=torch.int64), rows),
        (no_picks(len(rows) * S), torch.full((len(rows), S), -1), rows),
    ]


@pytest.mark.parametrize("granularity", ["document", "sequence"])
def test_empty_micro_batches_change_nothing(granularity):
    """A document read on both sides of an empty micro-batch (no rows, or rows of no tokens) is one
    read; a micro-batch of padding only ends it, as padding within a row does."""
    stats = SlotStatistics(4, ["a"], granularity, sample_batches=2)
    picks = [torch.tensor([[[1]], [[2]]])]
    stats.update(picks, torch.tensor([[5, 5]]))
    for _, doc_ids, _ in empty_batches(1)[:2]:
        stats.update([torch.zeros(0, 1, 1, dtype=torch.int64)], doc_ids)
    stats.update(picks, torch.tensor([[5, 5]]))
    assert (stats.num_documents, stats.num_tokens) == ((1 if granularity == "document" else 2), 4)
    assert stats.counts["a"].tolist() == [0, 2, 2, 0]
    assert stats.doc_freq["a"].tolist() == ([0, 1, 1, 0] if granularity == "document" else [0, 2, 2, 0])
    assert stats.micro_batches == 4


@pytest.mark.parametrize("num_streams", [1, 4])
def test_rereads_with_empty_micro_batches_match_brute_force(num_streams):
    batches = reread_batches(3, 24, num_streams, per_row=True)
    for at in (20, 11, 0):
        batches[at:at] = empty_batches(num_streams)
    stats = SlotStatistics(N, NAMES, "document", streams=num_streams, sample_batches=3)
    feed(stats, batches, per_row=True)
    assert_matches(stats, batches)
    assert stats.num_documents > 6
