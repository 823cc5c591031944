"""load_resharded: a run continued on other ranks or workers reads every row of its epoch, rereads
only the rows its summary counts, resumes exactly afterwards and returns to the usual scheme."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from data_helpers import SEQ_LEN, data_cfg
from pretrain.data import DataError, ShardLoader, read_manifest
from pretrain.data.mixture import MixtureLoader
from pretrain.data.sources import resolve_sources

OLD = [  # world, workers, shuffle_buffer, batch_size, batches per rank: all stop inside epoch 0
    pytest.param(2, 2, 0, 3, 5, id="2x2"),  # 9 and 6 rows per worker: mid-shard, at window starts
    pytest.param(2, 2, 5, 3, 5, id="2x2-shuffle"),
    pytest.param(3, 0, 0, 5, 7, id="3x0"),
    pytest.param(3, 0, 4, 5, 18, id="3x0-shuffle-ahead"),  # ranks 1, 2 (88 rows) are 2 rows into epoch 1
]
NEW = [pytest.param(1, 0, id="to1"), pytest.param(2, 1, id="to2x1"), pytest.param(4, 0, id="to4")]


def loader(ds, rank, world, workers, batch=3, shuffle=0, loop=True, seed=7):
    return ShardLoader(
        ds,
        "train",
        batch_size=batch,
        seq_len=SEQ_LEN,
        rank=rank,
        world_size=world,
        num_workers=workers,
        seed=seed,
        shuffle_buffer=shuffle,
        loop=loop,
    )


def keys(batch, doc_offset: int = 0) -> list[bytes]:
    """Each row's identity: its tokens, targets and document ids (less a mixture's offset)."""
    docs = batch.doc_ids.numpy()
    docs = np.where(docs >= 0, docs - doc_offset, docs)
    t, y = batch.tokens.numpy(), batch.targets.numpy()
    return [t[r].tobytes() + y[r].tobytes() + docs[r].tobytes() for r in range(len(t))]


def rows_of(batches) -> Counter:
    return Counter(k for b in batches for k in keys(b))


def epoch_rows(ds) -> Counter:
    """The reference: every row of one epoch, read by a single reader."""
    return rows_of(loader(ds, 0, 1, 0, batch=8, loop=False))


def json_copy(state):
    return json.loads(json.dumps(state))


def run_old(ds, world, workers, shuffle, batch, n):
    """The rows the saved run handed out and its ranks' states."""
    rows, states = Counter(), []
    for rank in range(world):
        old = loader(ds, rank, world, workers, batch=batch, shuffle=shuffle)
        rows += rows_of(islice(old, n))
        states.append(json_copy(old.state_dict()))
    return rows, states


def twice_in(summary: str) -> int:
    count = re.search(r"\((\d+|no) rows read twice\)", summary).group(1)
    return 0 if count == "no" else int(count)


def finish_epoch(ds, states, world, workers, **kw):
    """The rows the new layout reads to the end of the epoch the reshard continued; the summary."""
    rows, summaries = Counter(), set()
    for rank in range(world):
        new = loader(ds, rank, world, workers, loop=False, **kw)
        summaries.add(new.load_resharded(states))
        rows += rows_of(new)
    assert len(summaries) == 1  # every new rank made the same plan
    return rows, summaries.pop()


@pytest.mark.parametrize("world,workers", NEW)
@pytest.mark.parametrize("old_world,old_workers,shuffle,batch,n", OLD)
def test_every_row_of_the_epoch_is_read_and_only_the_counted_ones_twice(
    dataset, old_world, old_workers, shuffle, batch, n, world, workers
):
    old_rows, states = run_old(dataset, old_world, old_workers, shuffle, batch, n)
    new_rows, summary = finish_epoch(dataset, states, world, workers, batch=4, shuffle=3)
    reference = epoch_rows(dataset)
    assert not reference - (old_rows + new_rows)  # no row of the epoch lost
    twice = sum(((old_rows + new_rows) - reference).values())
    assert twice == twice_in(summary)
    readers = old_world * max(1, old_workers)
    epochs = [p[0] for s in states for p in s["positions"]]
    if shuffle == 0 and max(epochs) == 0:  # positions at window starts: nothing read twice
        assert twice == 0
    if max(epochs) == 0:
        assert twice <= readers * ((shuffle or batch) - 1)  # less than a window per old reader
    else:  # rows read past the epoch come again in the next one
        assert 0 < twice
    assert summary.startswith(f"data: readers {readers} -> {world * max(1, workers)}: epoch 0 continues with ")


def test_a_second_reshard_inside_the_same_epoch_still_covers_it(dataset):
    old_rows, states = run_old(dataset, 2, 2, 5, 3, 5)
    mid_rows, mid_states, summaries = Counter(), [], []
    for rank in range(4):
        mid = loader(dataset, rank, 4, 0, batch=2, shuffle=3)
        summaries.append(mid.load_resharded(states))
        mid_rows += rows_of(islice(mid, 6))
        mid_states.append(json_copy(mid.state_dict()))
    assert all(p[0] == 0 for s in mid_states for p in s["positions"])
    new_rows, summary = finish_epoch(dataset, mid_states, 1, 0)
    reference = epoch_rows(dataset)
    seen = old_rows + mid_rows + new_rows
    assert not reference - seen
    assert sum((seen - reference).values()) == twice_in(summaries[0]) + twice_in(summary)


@pytest.mark.parametrize("world,workers", NEW)
def test_exact_resume_after_a_reshard(dataset, world, workers):
    _, states = run_old(dataset, 2, 2, 5, 3, 5)
    n, m = 5, 60  # 65 batches of 4 rows cross into epoch 1 on every new reader (212 rows were left)
    for rank in range(world):
        straight = loader(dataset, rank, world, workers, batch=4, shuffle=5)
        straight.load_resharded(states)
        whole = list(islice(straight, n + m))
        first = loader(dataset, rank, world, workers, batch=4, shuffle=5)
        first.load_resharded(states)
        head = list(islice(first, n))
        state = json_copy(first.state_dict())
        assert state["version"] == 3 and state["plan"]["epoch"] == 0 and state["scheme"] == "rows"
        resumed = loader(dataset, rank, world, workers, batch=4, shuffle=5)
        resumed.load_state_dict(state)
        tail = list(islice(resumed, m))
        assert straight.stats["epoch"] >= 1  # the resumed part crosses from the plan into the scheme
        for a, b in zip(whole, head + tail, strict=True):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
            assert torch.equal(a.doc_ids, b.doc_ids)


@pytest.mark.parametrize("world,workers,shuffle", [(2, 1, 0), (4, 0, 3)])
def test_the_next_epoch_is_the_usual_scheme_of_the_new_layout(dataset, world, workers, shuffle):
    _, states = run_old(dataset, 3, 0, 0, 5, 7)
    for rank in range(world):
        resharded = loader(dataset, rank, world, workers, batch=4, shuffle=shuffle, loop=False)
        resharded.load_resharded(states)
        fresh = loader(dataset, rank, world, workers, batch=4, shuffle=shuffle, loop=False)
        for it in (resharded, fresh):
            list(it)  # epoch 0: the plan, or the scheme
        for a, b in zip(resharded, fresh, strict=True):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_ids, b.doc_ids)


def test_counters_move_to_rank_zero(dataset):
    _, states = run_old(dataset, 3, 0, 0, 5, 7)
    new = [loader(dataset, rank, 2, 0) for rank in range(2)]
    for n in new:
        n.load_resharded(states)
    assert [n.stats["batches"] for n in new] == [21, 0]


def test_version_1_states_still_load(dataset):
    straight = loader(dataset, 0, 1, 0, shuffle=4)
    whole = list(islice(straight, 12))
    first = loader(dataset, 0, 1, 0, shuffle=4)
    list(islice(first, 5))
    state = json_copy(first.state_dict())
    state["version"] = 1
    del state["plan"]
    resumed = loader(dataset, 0, 1, 0, shuffle=4)
    resumed.load_state_dict(state)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(whole[5:], islice(resumed, 7), strict=True))


def test_refusals_name_the_key_and_the_fix(dataset, second_dataset):
    _, states = run_old(dataset, 2, 0, 0, 3, 2)
    with pytest.raises(DataError, match=r"seed=7 vs 8.*same dataset, split and seed"):
        loader(dataset, 0, 1, 0, seed=8).load_resharded(states)
    with pytest.raises(DataError, match=rf"{second_dataset} is not the dataset this run was reading"):
        loader(second_dataset, 0, 1, 0).load_resharded(states)
    with pytest.raises(DataError, match=r"all 2 ranks .* got ranks \[0\]"):
        loader(dataset, 0, 1, 0).load_resharded(states[:1])
    with pytest.raises(DataError, match=r"world_size=2 vs 1.*load_resharded"):
        loader(dataset, 0, 1, 0).load_state_dict(states[0])


# ---- mixtures --------------------------------------------------------------------------
def mixture(sources, rank, world, batch=3, shuffle=4):
    return MixtureLoader(sources, batch_size=batch, rank=rank, world_size=world, seed=4, shuffle_buffer=shuffle)


def test_one_source_mixture_reshards_like_its_loader(dataset):
    sources = resolve_sources(data_cfg(dir=dataset))
    mix_states, plain_states = [], []
    for rank in range(2):
        mix = mixture(sources, rank, 2)
        plain = ShardLoader(dataset, batch_size=3, rank=rank, world_size=2, seed=4, shuffle_buffer=4)
        assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(islice(mix, 5), islice(plain, 5)))
        mix_states.append(json_copy(mix.state_dict()))
        plain_states.append(json_copy(plain.state_dict()))
    mix, plain = mixture(sources, 0, 1, batch=4), ShardLoader(dataset, batch_size=4, seed=4, shuffle_buffer=4)
    assert "partly used" not in mix.load_resharded(mix_states)  # whole batches only: nothing read again
    plain.load_resharded(plain_states)
    for a, b in zip(islice(mix, 40), islice(plain, 40)):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_ids, b.doc_ids)


def source_rows(batches, offset: int) -> tuple[list[bytes], list[bytes]]:
    """The rows of a two-source mixture's batches, per source (told apart by document id)."""
    out = ([], [])
    for b in batches:
        for r, key_a, key_b in zip(range(len(b.tokens)), keys(b), keys(b, offset)):
            second = int(b.doc_ids[r].max()) >= offset
            out[second].append(key_b if second else key_a)
    return out


@pytest.mark.parametrize("world", [1, 3])
def test_mixture_reshard_covers_each_source(dataset, second_dataset, world):
    sources = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 2.0, "b")))
    offset = sources[0].manifest["documents"]
    old_rows, states = [Counter(), Counter()], []
    for rank in range(2):
        mix = mixture(sources, rank, 2)
        for i, rows in enumerate(source_rows(islice(mix, 9), offset)):
            old_rows[i] += Counter(rows)
        states.append(json_copy(mix.state_dict()))
    assert all(p[0] == 0 for s in states for src in s["sources"] for p in src["loader"]["positions"])
    new_rows = [Counter(), Counter()]
    for rank in range(world):
        mix = mixture(sources, rank, world, batch=4, shuffle=3)
        summary = mix.load_resharded(states)
        left = []  # rows each source has left of epoch 0 on this rank: its resharded loader's epoch
        for i, src in enumerate(sources):
            alone = ShardLoader(
                src.dir, batch_size=4, rank=rank, world_size=world, seed=4, shuffle_buffer=3, loop=False
            )
            alone.load_resharded([s["sources"][i]["loader"] for s in states])
            left.append(sum(len(b.tokens) for b in alone))
        got, it = ([], []), iter(mix)
        while any(len(got[i]) < left[i] for i in range(2)):
            for i, rows in enumerate(source_rows([next(it)], offset)):
                got[i].extend(rows)
        for i in range(2):
            new_rows[i] += Counter(got[i][: left[i]])
    for i, src in enumerate(sources):
        reference = epoch_rows(src.dir)
        seen = old_rows[i] + new_rows[i]
        assert not reference - seen
        used = sum(s["sources"][i]["used"] for s in states)
        assert sum((seen - reference).values()) == twice_in(summary.split(";")[i]) + used
        assert used <= 2 * 3  # at most one batch per old rank
    assert f"{sum(s['sources'][i]['used'] for s in states for i in range(2))} rows of partly used" in summary


@pytest.mark.parametrize("world", [1, 3])
def test_mixture_resumes_exactly_after_a_reshard(dataset, second_dataset, world):
    sources = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 2.0, "b")))
    states = []
    for rank in range(2):
        mix = mixture(sources, rank, 2)
        list(islice(mix, 7))
        states.append(json_copy(mix.state_dict()))
    drawn = 0
    for rank in range(world):
        straight = mixture(sources, rank, world, batch=4)
        straight.load_resharded(states)
        drawn += sum(straight.sequences)
        it = iter(straight)
        whole = [next(it) for _ in range(30)]
        first = mixture(sources, rank, world, batch=4)
        first.load_resharded(states)
        it = iter(first)
        head = [next(it) for _ in range(9)]
        resumed = mixture(sources, rank, world, batch=4)
        resumed.load_state_dict(json_copy(first.state_dict()))
        it = iter(resumed)
        for a, b in zip(whole, head + [next(it) for _ in range(21)], strict=True):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.doc_ids, b.doc_ids)
        fresh = mixture(sources, rank, world, batch=4)
        assert first._rng.random() != fresh._rng.random()  # a new stream of source draws
    assert drawn == 2 * 7 * 3  # rows drawn per source move to new rank 0


def test_the_rest_is_dealt_evenly(dataset):
    _, states = run_old(dataset, 3, 0, 0, 5, 7)  # 35 rows read per old rank
    per_rank = []
    for rank in range(4):
        new = loader(dataset, rank, 4, 0, loop=False)
        new.load_resharded(states)
        per_rank.append(sum(len(b.tokens) for b in new))
    assert sum(per_rank) == read_manifest(dataset)["splits"]["train"]["sequences"] - 3 * 35
    assert max(per_rank) - min(per_rank) <= 1  # cut by rows, not dealt by shard


def test_mixture_reshard_with_a_source_added_and_one_removed(dataset, second_dataset):
    """Saved on 2 ranks as [a, b], continued on 1 as [b, c] (c: a's rows under a new name). b's
    rows are its own loader resharded from the saved states; c's are a fresh reader's from the
    start; a's position is dropped, and only b's drawn rows are kept."""
    before = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 2.0, "b")))
    after = resolve_sources(data_cfg((second_dataset, 2.0, "b"), (dataset, 1.0, "c")))
    states = []
    for rank in range(2):
        mix = mixture(before, rank, 2)
        list(islice(mix, 9))
        states.append(json_copy(mix.state_dict()))
    mix = mixture(after, 0, 1, batch=4, shuffle=3)
    summary = mix.load_resharded(states)
    assert summary.startswith("data: b: readers 2 -> 1") and "; c: new, from its start;" in summary
    assert " a: " not in summary
    assert mix.sequences == [sum(s["sequences"][1] for s in states), 0]

    got = source_rows(islice(mix, 30), offset=after[0].manifest["documents"])
    b_alone = ShardLoader(second_dataset, batch_size=4, seed=4, shuffle_buffer=3)
    b_alone.load_resharded([s["sources"][1]["loader"] for s in states])
    c_alone = ShardLoader(dataset, batch_size=4, seed=4, shuffle_buffer=3)
    for rows, alone in zip(got, (b_alone, c_alone)):
        assert len(rows) > 20
        assert rows == [k for b in islice(alone, 30) for k in keys(b)][: len(rows)]
