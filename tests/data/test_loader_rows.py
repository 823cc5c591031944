"""The loader splits each epoch's rows, not whole shards, over ranks x workers: on 5 shards of
unequal size, readers taking batches at one pace read every row once per pass (before, 5 shards
over 4 readers left one reader two shards while the others re-read theirs: the docs/own-corpus.md recipe's
data/english at 2 ranks x 2 workers read 193 of 1267 rows twice and 196 never in one pass's worth
of steps). Rows are counted against the shards read directly, not through the loader. States of
versions 1 and 2 (whole shards per reader) resume that scheme, checked against a model of it."""

from __future__ import annotations

import json
import math
import warnings
from collections import Counter
from itertools import islice

import numpy as np
import pytest
import torch

from data_helpers import SEQ_LEN, row_keys, shard_rows
from pretrain.data import ShardLoader, read_manifest, write_dataset
from pretrain.data.errors import DataError
from pretrain.data.mixture import MixtureLoader
from pretrain.data.sources import Source

LAYOUTS = [pytest.param(2, 2, id="2ranks-x-2workers"), pytest.param(3, 0, id="3ranks-x-1worker")]


def five_shards(out, tokenizer, documents, per_shard):
    manifest = write_dataset(
        tokenizer.encode_batch(documents),
        out,
        tokenizer,
        SEQ_LEN,
        val_fraction=0.2,
        seed=3,
        sequences_per_shard=per_shard,
        rows_per_block=7,
        show_progress=False,
    )
    sizes = [s["sequences"] for s in manifest["splits"]["train"]["shards"]]
    assert len(sizes) == 5 and len(set(sizes)) == 2, sizes  # 5 shards, the last one shorter
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, tokenizer, documents):
    """274 rows in shards of 60, 60, 60, 60, 34."""
    return five_shards(tmp_path_factory.mktemp("rows") / "data", tokenizer, documents, 60)


def loader(ds, rank, world, workers, batch=2, shuffle=0, loop=True, seed=5):
    return ShardLoader(ds, "train", batch, SEQ_LEN, rank, world, workers, seed=seed, shuffle_buffer=shuffle, loop=loop)


@pytest.mark.parametrize("shuffle", [0, 5])
@pytest.mark.parametrize("world,workers", LAYOUTS)
def test_one_pass_of_steps_reads_every_row_once(data, world, workers, shuffle):
    """Each step takes one batch from every rank (a rank's DataLoader asks its workers in turn).
    Over the steps one epoch's rows fill, no row is read twice and only the rows that do not fill
    a step for every reader are left; over each rank's whole epoch (loop=False) every row is read
    exactly once, and the ranks' shares differ by at most a row per reader."""
    reference = Counter(row for shard in shard_rows(data) for row in shard)
    total, batch, w = sum(reference.values()), 2, max(1, workers)
    steps = total // (batch * world * w) * w  # every worker gives as many batches
    eos = read_manifest(data)["eos_id"]
    its = [iter(loader(data, r, world, workers, batch, shuffle)) for r in range(world)]
    seen = Counter()
    for _ in range(steps):
        for it in its:
            seen.update(row_keys(next(it), eos))
    assert set(seen) <= set(reference)
    assert sum(n - 1 for n in seen.values()) == 0, "rows read twice"
    assert total - len(seen) == total - steps * batch * world  # 2 of 274 on 2 x 2, 4 on 3 x 1

    epoch, shares = Counter(), []
    for r in range(world):
        rows = [k for b in loader(data, r, world, workers, batch, shuffle, loop=False) for k in row_keys(b, eos)]
        epoch.update(rows)
        shares.append(len(rows))
    assert epoch == reference
    assert max(shares) - min(shares) <= w


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 3, 61, 274, 1000])
def test_the_first_rows_of_an_epoch_are_split_across_the_ranks_each_read_once(data, world, n):
    """rows=n (evaluation): the ranks, in rank order, read the first n rows (all 274 when n is
    more) of the epoch one rank alone reads, each once, in contiguous parts within a row of each
    other in size; a rank left without a row reads none (also with fewer rows than ranks)."""
    reference = Counter(row for shard in shard_rows(data) for row in shard)
    eos = read_manifest(data)["eos_id"]
    whole = [k for b in loader(data, 0, 1, 0, batch=3, loop=False) for k in row_keys(b, eos)]
    assert Counter(whole) == reference  # one rank's epoch: every row once
    parts = [
        [
            k
            for b in ShardLoader(data, "train", 3, SEQ_LEN, r, world, seed=5, loop=False, rows=n)
            for k in row_keys(b, eos)
        ]
        for r in range(world)
    ]
    assert [k for part in parts for k in part] == whole[:n]
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_reading_with_workers_leaves_the_global_rng_alone(data):
    """DataLoader workers draw their base seed from the loader's own generator: the global torch
    state a resumed run restores before its loader starts is the one its training then draws from."""
    before = torch.get_rng_state()
    next(iter(loader(data, 0, 1, 2)))
    assert torch.equal(torch.get_rng_state(), before)


def test_first_rows_are_for_one_pass(data):
    with pytest.raises(DataError, match=r"rows=4 \(the first rows of one epoch\) needs rows >= 1 and loop=False"):
        ShardLoader(data, rows=4)


@pytest.mark.parametrize("world,workers", [*LAYOUTS, pytest.param(2, 0, id="2ranks-x-1worker")])
def test_stop_and_resume_is_bitwise_the_uninterrupted_run(data, world, workers):
    """Stopped mid-epoch and rebuilt from the JSON state: the same batches as a run never
    stopped, across the next epoch's boundary (whose row split differs)."""
    n = 14  # 28 batches of 8 rows per rank: every reader crosses into epoch 1
    for rank in range(world):
        whole = list(islice(loader(data, rank, world, workers, batch=8, shuffle=5), 2 * n))
        first = loader(data, rank, world, workers, batch=8, shuffle=5)
        head = list(islice(first, n))
        state = json.loads(json.dumps(first.state_dict()))
        assert state["version"] == 3 and state["scheme"] == "rows"
        resumed = loader(data, rank, world, workers, batch=8, shuffle=5)
        resumed.load_state_dict(state)
        tail = list(islice(resumed, n))
        assert resumed.stats["epoch"] >= 1
        for a, b in zip(whole, head + tail, strict=True):
            assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
            assert torch.equal(a.doc_ids, b.doc_ids)


def old_scheme_rows(shards, seed, consumer, consumers, plan=None):
    """A model of the loader before 2026-12-06 (no shuffle buffer): the rows consumer `consumer`
    reads, epoch after epoch: whole shards perm(seed, epoch)[consumer::consumers], or in the
    plan's epoch 0 the plan's [shard, first row] pieces."""
    epoch = 0
    while True:
        if plan is not None and epoch == 0:
            pieces = plan
        else:
            order = np.random.default_rng([seed, epoch]).permutation(len(shards))
            pieces = [[k, 0] for k in order[consumer::consumers]]
        for k, first in pieces:
            yield from shards[k][first:]
        epoch += 1


def old_position(shards, seed, consumer, consumers, rows_read):
    """[epoch, shard index in the consumer's list, row] the old loader saved after `rows_read` rows
    (whole batches inside epoch 0)."""
    order = np.random.default_rng([seed, 0]).permutation(len(shards))
    for i, k in enumerate(order[consumer::consumers]):
        if rows_read < len(shards[k]):
            return [0, i, rows_read, 0]
        rows_read -= len(shards[k])
    raise AssertionError("past epoch 0")


def old_state(data, shards, rank, world, rows_read, version):
    """The state the old loader saved on rank `rank` of `world` (no workers, batches of 4) after `rows_read` rows."""
    return {
        "version": version,
        "settings": loader(data, rank, world, 0, batch=4).state_dict()["settings"],  # unchanged since version 1
        "positions": [old_position(shards, 5, rank, world, rows_read)],
        "next_worker": 0,
        "worker_stats": [{}],
        "batches": rows_read // 4,
        **({"plan": None} if version == 2 else {}),
    }


@pytest.mark.parametrize("version", [1, 2])
def test_a_state_saved_before_the_row_split_resumes_its_whole_shards(data, version):
    """A version-1/2 state as the old loader saved it (2 ranks, 10 batches of 4 rows read) goes on
    with the rows the old scheme gives, into later epochs, and saves itself as that scheme."""
    shards = shard_rows(data)
    eos = read_manifest(data)["eos_id"]
    for rank in range(2):
        resumed = loader(data, rank, 2, 0, batch=4)
        resumed.load_state_dict(old_state(data, shards, rank, 2, 40, version))
        got = [k for b in islice(resumed, 100) for k in row_keys(b, eos)]
        assert got == list(islice(old_scheme_rows(shards, 5, rank, 2), 40, 440))  # 400 rows: epochs 0 to 2
        saved = resumed.state_dict()
        assert saved["version"] == 3 and saved["scheme"] == "shards"
        again = loader(data, rank, 2, 0, batch=4)
        again.load_state_dict(json.loads(json.dumps(saved)))
        assert [k for b in islice(again, 10) for k in row_keys(b, eos)] == list(
            islice(old_scheme_rows(shards, 5, rank, 2), 440, 480)
        )


def test_a_state_saved_before_the_row_split_reshards_onto_it(data):
    """Version-2 states of 2 ranks (40 rows read each; rank 0's first shard holds 34), continued on
    3: the rest of epoch 0 is cut into parts at most a row apart, no row of it is lost or read
    twice, and the next epoch is the row split."""
    shards = shard_rows(data)
    eos = read_manifest(data)["eos_id"]
    states = [old_state(data, shards, rank, 2, 40, 2) for rank in range(2)]
    seen = Counter(row for rank in range(2) for row in islice(old_scheme_rows(shards, 5, rank, 2), 40))
    shares, summaries = [], set()
    for rank in range(3):
        new = loader(data, rank, 3, 0, batch=4, loop=False)
        summaries.add(new.load_resharded(states))
        rows = [k for b in new for k in row_keys(b, eos)]
        seen.update(rows)
        shares.append(len(rows))
        fresh = loader(data, rank, 3, 0, batch=4, loop=False)
        list(fresh)
        assert [k for b in new for k in row_keys(b, eos)] == [k for b in fresh for k in row_keys(b, eos)]
        assert new.state_dict()["scheme"] == "rows"
    assert seen == Counter(row for shard in shards for row in shard)
    assert max(shares) - min(shares) <= 1
    assert summaries == {"data: readers 2 -> 3: epoch 0 continues with its 194 rows left, 2 partly read and "
                         "2 unread pieces of shards (no rows read twice)"}  # fmt: skip


def test_a_version_2_plan_resumes(data):
    """A version-2 state left by a reshard: its plan's pieces [shard, first row] run to the shard's end."""
    shards = shard_rows(data)
    eos = read_manifest(data)["eos_id"]
    plan = [[3, 7], [1, 0]]
    state = loader(data, 0, 2, 0, batch=4).state_dict()
    state.update(version=2, plan={"epoch": 0, "work": [plan]})
    del state["scheme"]
    resumed = loader(data, 0, 2, 0, batch=4)
    resumed.load_state_dict(state)
    got = [k for b in islice(resumed, 60) for k in row_keys(b, eos)]
    assert got == list(islice(old_scheme_rows(shards, 5, 0, 2, plan), 240))


def test_a_mixture_keeps_its_weights_and_reads_each_source_once(data, tmp_path, tokenizer, documents):
    """Two 5-shard sources, weights 1:3, 4 ranks: the rows drawn follow the weights, and the first
    rows each rank draws of a source, up to an equal share of it, hold every row at most once."""
    other = five_shards(tmp_path / "other", tokenizer, documents, 57)  # 274 rows: 57, 57, 57, 57, 46
    sources = [Source("a", data, 1.0, read_manifest(data)), Source("b", other, 3.0, read_manifest(other))]
    offsets = [0, sources[0].manifest["documents"]]  # source b's document ids come after a's
    references = [Counter(row for shard in shard_rows(s.dir) for row in shard) for s in sources]
    eos, world, batch = sources[0].manifest["eos_id"], 4, 4
    seen, drawn = [Counter(), Counter()], [0, 0]
    for rank in range(world):
        rows = ([], [])  # each source's rows in the order this rank drew them
        for b in islice(MixtureLoader(sources, batch, rank, world, seed=2, shuffle_buffer=5), 120):
            per_source = [row_keys(b, eos, offset) for offset in offsets]
            for r in range(batch):
                i = int(b.doc_ids[r, 0] >= offsets[1])
                rows[i].append(per_source[i][r])
        for i, reference in enumerate(references):
            share = sum(reference.values()) // world
            assert len(rows[i]) >= share
            seen[i].update(rows[i][:share])
            drawn[i] += len(rows[i])
    n = sum(drawn)
    assert abs(drawn[1] - 0.75 * n) <= 4 * math.sqrt(n * 0.75 * 0.25), drawn
    for i, reference in enumerate(references):
        assert set(seen[i]) <= set(reference)
        assert sum(c - 1 for c in seen[i].values()) == 0, f"source {sources[i].name}: rows read twice"
        total = sum(reference.values())
        assert total - len(seen[i]) == total % world


def block_offsets(path):
    """Byte offset of each block's token payload in a shard, in block order."""
    import tarfile

    with tarfile.open(path) as tar:
        return [m.offset_data for m in tar.getmembers() if m.name.endswith(".tokens")]


@pytest.mark.parametrize("where", ["first block", "block before the cut", "block after the cut"])
def test_a_corrupt_shard_cut_between_readers_is_counted_once(data, tmp_path, where):
    """A shard cut between two readers, damaged in its first part: both readers meet the damage
    (the second decodes the shard from its start to reach its first row), and with
    data.on_corrupt=skip both skip; corrupt_shards_skipped, summed over the readers, counts it once
    wherever the damaged block lies. Every other shard's rows are read once."""
    import shutil

    from pretrain.data.work_plan import ROWS, work_of

    ds = tmp_path / "data"
    shutil.copytree(data, ds)
    world, rows_per_block = 2, 7  # shard 1 is cut at row 43, inside its block of rows 42-48
    probe = loader(ds, 0, world, 0)
    works = [work_of(ROWS, {**probe._settings(), "rank": r}, None, probe.sizes, 0, 0) for r in range(world)]
    after = lambda first: (first // rows_per_block + 1) * rows_per_block  # noqa: E731  the next block's first row
    # a cut inside a block, with a whole block after it in the second reader's piece
    shard, cut = next((s, a) for w in works for s, a, b in w if a % rows_per_block and after(a) < b)
    row = {"first block": 0, "block before the cut": cut - 1, "block after the cut": after(cut)}[where]
    path = ds / probe.shards[shard]["path"]
    blob = bytearray(path.read_bytes())
    blob[block_offsets(path)[row // rows_per_block] + 5] ^= 0xFF  # a token byte: the block's crc32 fails
    path.write_bytes(bytes(blob))

    eos, counted, met, seen = read_manifest(ds)["eos_id"], 0, 0, Counter()
    for r in range(world):
        skipping = ShardLoader(ds, "train", 2, SEQ_LEN, r, world, 0, seed=5, loop=False, on_corrupt="skip")
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            seen.update(k for b in skipping for k in row_keys(b, eos))
        met += any("skipping the rest of a shard" in str(w.message) for w in said)
        counted += skipping.stats["corrupt_shards_skipped"]
    assert met == (1 if where == "block after the cut" else 2)  # the readers that skip (part of) the shard
    assert counted == 1
    rows = shard_rows(data)
    others = Counter(k for n, s in enumerate(rows) if n != shard for k in s)
    assert Counter({k: n for k, n in seen.items() if k in others}) == others


def test_read_blocks_from_a_row_yields_the_rows_from_there_and_converts_no_block_before(data):
    """read_blocks(first_row=k): the rows k.. of the shard, bitwise those of a read from row 0,
    in blocks from the one holding row k (cut to start there): the blocks before it are checked
    but not yielded. Every k of a 60-row shard in blocks of 7 (block starts, ends and inside)."""
    from pretrain.data.shards import read_blocks

    m = read_manifest(data)
    shard = m["splits"]["train"]["shards"][0]
    args = (data / shard["path"], m["seq_len"] + 1, m["token_dtype"], shard["sequences"])
    whole = list(read_blocks(*args, sha256=shard["sha256"], vocab_size=m["vocab_size"]))
    tokens, meta = np.concatenate([t for t, _ in whole]), np.concatenate([x for _, x in whole])
    for k in range(shard["sequences"] + 1):
        blocks = list(read_blocks(*args, sha256=shard["sha256"], vocab_size=m["vocab_size"], first_row=k))
        assert len(blocks) == sum(1 for end in np.cumsum([len(t) for t, _ in whole]) if end > k)
        got_t = np.concatenate([t for t, _ in blocks]) if blocks else tokens[:0]
        got_m = np.concatenate([x for _, x in blocks]) if blocks else meta[:0]
        assert got_t.dtype == np.int64 and np.array_equal(got_t, tokens[k:]) and np.array_equal(got_m, meta[k:])


@pytest.mark.parametrize("world", [3, 4])
def test_readers_starting_mid_shard_read_their_pieces_bitwise(data, world):
    """4 (or 3) readers, shards cut between them: each reader's epoch is exactly the rows of its
    pieces (shard, first row, end row), read from a whole-shard reading (`shard_rows`)."""
    from pretrain.data.work_plan import ROWS, work_of

    rows, eos = shard_rows(data), read_manifest(data)["eos_id"]
    for r in range(world):
        reader = loader(data, r, world, 0, batch=3, loop=False)
        work = work_of(ROWS, reader._settings(), None, reader.sizes, 0, 0)
        assert any(first > 0 for _, first, _ in work) or r == 0
        expected = [k for shard, first, end in work for k in rows[shard][first:end]]
        got = [k for b in reader for k in row_keys(b, eos)]
        assert got == expected[: len(got)] and len(expected) - len(got) < 3  # a last partial batch is dropped
