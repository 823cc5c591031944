"""Weighted mixtures of prepared datasets: proportions, exact resume, bad input refused early."""

from __future__ import annotations

import io
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_helpers import SEQ_LEN, data_cfg, make_documents
from pretrain.data import DataError, ShardLoader, train_tokenizer, write_dataset
from pretrain.data.mixture import MixtureLoader
from pretrain.data.sources import resolve_sources


def mixture(sources, **kw):
    kw.setdefault("batch_size", 4)
    return MixtureLoader(sources, **kw)


def take(loader_iter, n):
    return [next(loader_iter) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.tokens, y.tokens) and torch.equal(x.targets, y.targets)
        assert torch.equal(x.doc_ids, y.doc_ids)


def test_proportions_follow_the_weights(tmp_path, dataset, second_dataset):
    weights = {"a": 1.0, "b": 3.0, "c": 0.5}
    third = shutil.copytree(dataset, tmp_path / "c")  # one folder may not be two sources
    sources = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 3.0, "b"), (third, 0.5, "c")))
    mix = mixture(sources, batch_size=64, seed=11)
    it = iter(mix)
    for _ in range(320):  # 20,480 drawn sequences
        next(it)
    n = sum(mix.sequences)
    assert n == 20_480
    total = sum(weights.values())
    for name, count in zip(["a", "b", "c"], mix.sequences):
        p = weights[name] / total
        assert abs(count - n * p) <= 4 * math.sqrt(n * p * (1 - p)), (name, count, n * p)
    assert mix.tokens_per_source() == {k: c * SEQ_LEN for k, c in zip("abc", mix.sequences)}


def test_weights_whose_sum_overflows_are_refused(dataset, second_dataset):
    """Weights 1e308 and 1e308 summed to inf: shares 0 and 0, and every row came from the last source (a
    run trained on B alone, without a word; the plan and the data log line showed 0 epochs, 0.000)."""
    with pytest.raises(DataError, match=r"^data\.sources: the weights \[1e\+308, 1e\+308\] sum to more than a"):
        resolve_sources(data_cfg((dataset, 1e308, "a"), (second_dataset, 1e308, "b")))
    assert len(resolve_sources(data_cfg((dataset, 1e307, "a"), (second_dataset, 1e307, "b")))) == 2


def test_rows_are_the_sources_own_sequences_in_order(dataset, second_dataset):
    """Each source's rows, concatenated in draw order, are exactly that source's ShardLoader stream."""
    sources = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 2.0, "b")))
    mix = mixture(sources, batch_size=4, seed=3)
    draws_rng = np.random.default_rng([3, 0, 0x6D6978])
    got = {0: [], 1: []}
    for batch in take(iter(mix), 12):
        draws = (draws_rng.random(4) >= 1 / 3).astype(int)  # source 1 with probability 2/3
        for row, src in zip(batch.tokens, draws):
            got[int(src)].append(row)
    for i, src in enumerate(sources):
        alone = torch.cat([b.tokens for b in take(iter(ShardLoader(src.dir, batch_size=4, seed=3)), 12)])
        assert torch.equal(torch.stack(got[i]), alone[: len(got[i])])


def test_single_source_is_its_shard_loader(dataset):
    mix = mixture(resolve_sources(data_cfg(dir=dataset)), batch_size=4, seed=2, num_workers=2)
    assert_same_batches(take(iter(mix), 7), take(iter(ShardLoader(dataset, batch_size=4, seed=2, num_workers=2)), 7))


def test_document_ids_are_unique_across_sources(dataset, second_dataset):
    sources = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 1.0, "b")))
    mix = mixture(sources, batch_size=8)
    first_docs = sources[0].manifest["documents"]
    ids = torch.cat([b.doc_ids for b in take(iter(mix), 20)])
    assert int(ids.max()) >= first_docs  # the second source's documents come after the first's
    assert int(ids[ids >= 0].min()) >= 0


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2)])
def test_resume_is_exact(dataset, second_dataset, world, workers):
    sources = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 2.0, "b")))
    for rank in range(world):
        kw = dict(batch_size=3, rank=rank, world_size=world, num_workers=workers, seed=4, shuffle_buffer=5)
        uninterrupted = mixture(sources, **kw)
        straight = take(iter(uninterrupted), 14)
        first = mixture(sources, **kw)
        head = take(iter(first), 7)
        buf = io.BytesIO()
        torch.save(first.state_dict(), buf)
        buf.seek(0)
        resumed = mixture(sources, **kw)
        resumed.load_state_dict(torch.load(buf, weights_only=True))
        assert_same_batches(head + take(iter(resumed), 7), straight)
        assert resumed.sequences == uninterrupted.sequences and sum(resumed.sequences) == 14 * 3


def test_a_dropped_iterator_ends_its_workers_and_a_new_one_goes_on_where_it_stopped(dataset, second_dataset):
    """The trainer drops its batch iterator at the end of a run while the mixture itself lives on in
    a reference cycle: the sources' DataLoader iterators were then left to the cycle collector, which
    finalised their queues before their shutdown, so the workers never heard they should stop and
    each was joined for 5 s, then 5 s more after a SIGTERM they ignore (42 s for a trainer test of
    4 steps). They end with the mixture's iterator now, and a new iterator draws on from there."""
    import multiprocessing

    sources = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 2.0, "b")))
    kw = dict(batch_size=3, num_workers=2, seed=4, shuffle_buffer=5)
    straight = take(iter(mixture(sources, **kw)), 10)
    assert not multiprocessing.active_children()  # the straight run's workers are gone too
    mix = mixture(sources, **kw)
    mix.cycle = mix  # as the trainer holds it: only the cycle collector would free it
    batches = iter(mix)
    head = take(batches, 4)
    workers = multiprocessing.active_children()
    assert len(workers) == 2 * 2  # each source's two DataLoader workers
    del batches
    assert not multiprocessing.active_children()
    assert [w.exitcode for w in workers] == [0] * 4  # told to stop, not killed
    assert_same_batches(head + take(iter(mix), 6), straight)
    assert sum(mix.sequences) == 10 * 3


def test_resume_refuses_another_seed(dataset, second_dataset):
    sources = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 2.0, "b")))
    state = mixture(sources, seed=1).state_dict()
    with pytest.raises(DataError, match=r"seed=1 vs 2; resume with the same batch size and seed \(data.sources may"):
        mixture(sources, seed=2).load_state_dict(state)


def test_resume_with_a_source_added_and_one_removed(dataset, second_dataset):
    """[a, b] 1:1 for 6 batches, then [b, c] 1:2 where c holds a's rows under a new name: b goes
    on from its position, c starts at its beginning, a is left where it was. Each row's source is
    the saved generator's uniform draw mapped through the sources of its step (replayed here),
    and each source's rows are that source's own stream, in order."""
    before = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 1.0, "b")))
    after = resolve_sources(data_cfg((second_dataset, 1.0, "b"), (dataset, 2.0, "c")))
    first = mixture(before, batch_size=8, seed=5)
    head = take(iter(first), 6)
    resumed = mixture(after, batch_size=8, seed=5)
    resumed.load_state_dict(first.state_dict())
    tail = take(iter(resumed), 20)

    uniform = np.random.default_rng([5, 0, 0x6D6978])
    rows = {"a": [], "b": [], "c": []}
    for step, batch in enumerate(head + tail):
        u = uniform.random(8)
        names = np.where(u < 1 / 2, "a", "b") if step < 6 else np.where(u < 1 / 3, "b", "c")
        for row, name in zip(batch.tokens, names):
            rows[str(name)].append(row)
    for name, directory in (("a", dataset), ("b", second_dataset), ("c", dataset)):
        alone = torch.cat([b.tokens for b in take(iter(ShardLoader(directory, batch_size=8, seed=5)), 30)])
        assert len(rows[name]) > 8
        assert torch.equal(torch.stack(rows[name]), alone[: len(rows[name])]), name
    b_before = sum(1 for batch in head for _ in batch.tokens) - len(rows["a"])
    assert resumed.sequences == [len(rows["b"]), len(rows["c"])] and resumed.sequences[0] > b_before
    assert sum(resumed.sequences) == 26 * 8 - len(rows["a"])  # a's rows are no longer counted


def test_mixture_change_describes_what_a_resume_changes(tmp_path):
    from pretrain.data.sources import mixture_change

    web, code, docs = (str(tmp_path / n) for n in ("web", "code", "docs"))

    def data(*specs, dir=""):
        return {"dir": dir, "sources": [{"dir": d, "weight": w, "name": n} for d, w, n in specs]}

    base = data((web, 3.0, "web"), (docs, 1.0, "docs"))
    assert mixture_change(base, base) is None
    assert mixture_change(base, data((web, 1.0, "web"), (docs, 1.0, "docs"))) == "web 3 -> 1"
    assert mixture_change(base, data((docs, 1.0, "docs"), (web, 3.0, "web"))) == "sources reordered"
    assert (
        mixture_change(base, data((web, 1.0, "web"), (code, 2.0, "code")))
        == "added code (weight 2, from its start); removed docs; web 3 -> 1"
    )
    # data.dir is a mixture of one named after its folder; the embedded corpus is no mixture
    assert mixture_change(data(dir=web), data((web, 1.0, "web"), (code, 1.0, "code"))) == (
        "added code (weight 1, from its start)"
    )
    assert mixture_change(data(), base) is None
    moved = str(tmp_path / "fast" / "web")
    assert mixture_change(base, data((moved, 3.0, "web"), (docs, 1.0, "docs"))) == f"web moved {web} -> {moved}"
    with pytest.raises(DataError, match=r"'docs2' reads .*docs, which this run read as 'docs' so far: keep the name"):
        mixture_change(base, data((web, 3.0, "web"), (docs, 1.0, "docs2")))


def test_resume_with_new_weights_continues_every_source_and_draws_by_them(dataset, second_dataset):
    """An annealing mixture: 1:3 for 10 batches, then 3:1. Each row's source is the same uniform
    draw mapped through the new weights (replayed here from the generator's seed), and each
    source's rows over the change are its own stream in order: nothing read twice or skipped."""
    before = resolve_sources(data_cfg((dataset, 1.0, "a"), (second_dataset, 3.0, "b")))
    after = resolve_sources(data_cfg((dataset, 3.0, "a"), (second_dataset, 1.0, "b")))
    first = mixture(before, batch_size=8, seed=5)
    head = take(iter(first), 10)
    resumed = mixture(after, batch_size=8, seed=5)
    resumed.load_state_dict(first.state_dict())
    tail = take(iter(resumed), 30)

    uniform = np.random.default_rng([5, 0, 0x6D6978])
    got = {0: [], 1: []}
    for step, batch in enumerate(head + tail):
        share_of_a = 1 / 4 if step < 10 else 3 / 4
        sources = (uniform.random(8) >= share_of_a).astype(int)
        for row, src in zip(batch.tokens, sources):
            got[int(src)].append(row)
    for i, src in enumerate(before):
        alone = torch.cat([b.tokens for b in take(iter(ShardLoader(src.dir, batch_size=8, seed=5)), 40)])
        assert torch.equal(torch.stack(got[i]), alone[: len(got[i])])
    assert len(got[0]) > 2 * len(got[1]) - 80  # mostly a after the change (240 rows at 3:1 after 80 at 1:3)
    assert sum(resumed.sequences) == 40 * 8


def test_mismatched_tokenizers_are_refused_naming_both(tmp_path, dataset, documents):
    other_tok = train_tokenizer(documents[:40], tmp_path / "other.model", vocab_size=350)
    other = tmp_path / "other"
    write_dataset(
        other_tok.encode_batch(documents),
        other,
        other_tok,
        SEQ_LEN,
        val_fraction=0.2,
        sequences_per_shard=8,
        show_progress=False,
    )
    with pytest.raises(DataError) as err:
        resolve_sources(data_cfg((dataset, 1.0, "a"), (other, 1.0, "b")))
    msg = str(err.value)
    assert str(other / "tokenizer.model") in msg and str(dataset / "tokenizer.model") in msg
    assert "data.sources[1] (b)" in msg and "--tokenizer" in msg


@pytest.mark.filterwarnings("ignore:the training split is empty")  # the 'empty' source, on purpose
def test_bad_sources_are_refused_with_the_fix(tmp_path, dataset, tokenizer):
    with pytest.raises(DataError, match=r"data.sources\[1\] \(b\): weight=0.0 must be a positive"):
        resolve_sources(data_cfg((dataset, 1.0, "a"), (dataset, 0.0, "b")))
    with pytest.raises(DataError, match=r"weight=-1.0"):
        resolve_sources(data_cfg((dataset, -1.0, "a")))
    with pytest.raises(
        DataError,
        match=r"data.sources\[1\] \(gone\): .*gone holds no manifest.json \(the "
        r"directory does not exist\): prepare it with tools/prepare_data.py",
    ):
        resolve_sources(data_cfg((dataset, 1.0, "a"), (tmp_path / "gone", 1.0, "gone")))
    long = tmp_path / "long"
    write_dataset(
        tokenizer.encode_batch(make_documents(30)),
        long,
        tokenizer,
        SEQ_LEN * 2,
        val_fraction=0.2,
        sequences_per_shard=8,
        show_progress=False,
    )
    with pytest.raises(
        DataError,
        match=rf"data.sources\[1\] \(long\): .* seq_len={SEQ_LEN * 2} but .* "
        rf"seq_len={SEQ_LEN}: re-run tools/prepare_data.py --seq-len {SEQ_LEN}",
    ):
        resolve_sources(data_cfg((dataset, 1.0, "a"), (long, 1.0, "long")))
    with pytest.raises(DataError, match=rf"seq_len={SEQ_LEN * 2} but data.seq_len={SEQ_LEN}"):
        resolve_sources(data_cfg((long, 1.0, "long")), seq_len=SEQ_LEN)
    empty = tmp_path / "empty"  # every document went to validation: no training sequence
    write_dataset([[5, 6, 7]], empty, tokenizer, SEQ_LEN, val_fraction=0.999, seed=0, show_progress=False)
    manifest = json.loads((empty / "manifest.json").read_text())
    assert manifest["splits"]["train"]["sequences"] == 0
    with pytest.raises(DataError, match=r"data.sources\[1\] \(empty\): .* has no training sequences"):
        resolve_sources(data_cfg((dataset, 1.0, "a"), (empty, 1.0, "empty")))
    with pytest.raises(DataError, match="name.*used twice"):
        resolve_sources(data_cfg((dataset, 1.0, "a"), (dataset, 1.0, "a")))
    # A copied entry whose dir was left unchanged: 'b' would train on a's rows and report a's
    # validation loss as val_loss/b (accepted before, without a word). A link to the folder is the folder.
    (tmp_path / "link").symlink_to(dataset)
    for again in (dataset, tmp_path / "link", f"{dataset}/"):
        with pytest.raises(
            DataError, match=r"data.sources\[1\] \(b\): .* is also data.sources\[0\] \(a\): .*list it once \(weight 3 "
        ):
            resolve_sources(data_cfg((dataset, 1.0, "a"), (again, 2.0, "b")))
    from pretrain.data.sources import resolve_eval_sources

    held = SimpleNamespace(eval_sources=[dict(dir=str(dataset), name="x"), dict(dir=f"{dataset}/", name="y")])
    with pytest.raises(DataError, match=r"data.eval_sources\[1\] \(y\): .* is also listed as 'x'"):
        resolve_eval_sources(held, [])
    with pytest.raises(DataError, match="both set"):
        resolve_sources(data_cfg((dataset, 1.0, "a"), dir=dataset))


def test_a_corpus_file_or_a_misspelt_folder_as_data_dir_is_explained(tmp_path, dataset):
    """data.dir=corpus/english.jsonl (the corpus file) ended in a NotADirectoryError traceback, and
    memlayers-inspect-data on it said the 'dataset directory does not exist'; data.dir=data/englsh
    did not name the data/english beside it."""
    from pretrain.data.shards import read_manifest

    corpus = tmp_path / "english.jsonl"
    corpus.write_text('{"text": "one"}\n')
    with pytest.raises(DataError) as err:
        resolve_sources(data_cfg(dir=corpus))
    assert (
        f"{corpus} is a file, not a prepared dataset folder (the trainer reads the shards tools/prepare_data.py "
        f"writes); prepare it with tools/prepare_data.py --input {corpus} --output {tmp_path / 'english-prepared'} "
        in str(err.value)
    )
    with pytest.raises(DataError, match=rf"{corpus} is a file, not a prepared dataset folder: prepare it with "):
        read_manifest(corpus)
    misspelt = dataset.with_name(dataset.name[:-1])
    with pytest.raises(DataError, match=rf"\(the directory does not exist\): did you mean {dataset}\? Or prepare"):
        resolve_sources(data_cfg(dir=misspelt))


def test_a_misspelt_data_dir_beside_folders_it_may_not_read_is_still_explained(tmp_path, monkeypatch):
    """data.dir=/scratch/englsh beside another user's private folder (mode 700): looking for the
    nearest prepared dataset stat'ed <private>/manifest.json and the run ended in a PermissionError
    traceback (reproduced as an unprivileged user) instead of the 'does not exist' refusal; a parent
    folder that may not be listed (mode 711) did the same. The unreadable entries are passed over."""
    import errno
    import os

    import pretrain.data.sources as sources_module

    prepared = tmp_path / "english"  # a prepared dataset beside the user's private folder
    prepared.mkdir()
    (prepared / "manifest.json").write_text("{}")  # all the suggestion looks for
    private = tmp_path / "someone_else"
    private.mkdir()
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # what a non-root user meets (root, running the tests, reads anything)
        if str(path).startswith(str(private) + os.sep):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    misspelt = tmp_path / "englsh"
    with pytest.raises(DataError, match=rf"\(the directory does not exist\): did you mean {prepared}\? Or prepare"):
        resolve_sources(data_cfg(dir=misspelt))

    def unlistable(self):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(sources_module.Path, "iterdir", unlistable)
    with pytest.raises(DataError, match=r"\(the directory does not exist\): prepare it with tools/prepare_data.py"):
        resolve_sources(data_cfg(dir=misspelt))


def test_a_folder_that_is_not_a_dataset_is_named_with_what_it_is(tmp_path, dataset):
    """data.dir=corpus/ (the text itself) said "corpus holds no manifest.json: prepare it with
    tools/prepare_data.py --input <corpus> --output corpus", a command prepare_data refuses (the output
    would replace its input); data.dir=data/english/train (a split) was told to prepare into the split.
    Each now says what the folder is and names a command or folder that works."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text('{"text": "one"}\n')
    shutil.copyfile(dataset / "tokenizer.model", corpus / "tokenizer.model")  # binary: not text
    with pytest.raises(DataError) as err:
        resolve_sources(data_cfg(dir=corpus))
    assert (
        f"holds no manifest.json but 1 file(s) of text (a.jsonl): a corpus, which the trainer cannot read as it is; "
        f"prepare it with tools/prepare_data.py --input {corpus} --output {tmp_path / 'corpus-prepared'} "
        in str(err.value)
    )
    with pytest.raises(DataError, match=rf"{dataset / 'train'} is a folder inside the prepared dataset {dataset}: "):
        resolve_sources(data_cfg(dir=dataset / "train"))
    with pytest.raises(DataError, match=r"\(the directory does not exist\): prepare it with"):
        resolve_sources(data_cfg(dir=tmp_path / "nothing"))
