"""Hostile or broken inputs to the data tools and the loader: each is refused with the file
named, nothing half-written; foreign shards and out-of-vocabulary ids are caught."""

from __future__ import annotations

import gzip
import importlib
import json
import re
import shutil
import tarfile

import numpy as np
import pytest

from data_helpers import SEQ_LEN, write_jsonl  # noqa: E402
from pretrain.data import DataError, ShardLoader, iter_documents, train_tokenizer, write_dataset
from pretrain.data.shards import CorruptShardError, read_manifest
from tools import prepare_data as prepare_cli
from tools import train_tokenizer as tokenizer_cli


@pytest.mark.parametrize("bad", [None, ["a", "list"], 123, {"nested": "x"}])
def test_jsonl_text_that_is_not_a_string_is_refused(tmp_path, bad, capsys):
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, [{"text": "fine words here"}, {"text": bad}, {"text": "more words"}])
    with pytest.raises(DataError, match=rf"c.jsonl:2: field 'text' is {type(bad).__name__}"):
        list(iter_documents([corpus]))
    assert (
        tokenizer_cli.main(["--input", str(corpus), "--output", str(tmp_path / "t.model"), "--vocab-size", "300"]) == 2
    )
    assert "c.jsonl:2" in capsys.readouterr().err and not (tmp_path / "t.model").exists()
    out = tmp_path / "ds"
    assert (
        prepare_cli.main(
            ["--input", str(corpus), "--output", str(out), "--vocab-size", "300", "--no-progress", "--workers", "1"]
        )
        == 2
    )
    assert "c.jsonl:2" in capsys.readouterr().err and not out.exists()


def test_tokenizer_threads_below_one_are_refused_before_the_corpus_is_read(tmp_path, monkeypatch, capsys):
    """--threads 0 or -2 read the whole sample, then sentencepiece stopped with a traceback."""

    def unread(*args, **kwargs):
        raise AssertionError("the corpus was read")
        yield

    monkeypatch.setattr(tokenizer_cli, "iter_documents", unread)
    for threads in ("0", "-2"):
        with pytest.raises(SystemExit) as exit_:
            tokenizer_cli.main(["--input", "c.jsonl", "--output", str(tmp_path / "t.model"), "--threads", threads])
        assert exit_.value.code == 2
        assert f"argument --threads: {threads} must be an integer >= 1" in capsys.readouterr().err
    with pytest.raises(DataError, match=r"num_threads=2000 must be in 1..1024 \(--threads\)"):
        train_tokenizer(unread(), tmp_path / "t.model", 300, num_threads=2000)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool", ["train_tokenizer", "sample_corpus"])
def test_a_folder_as_output_is_refused_before_any_work(tmp_path, tool, monkeypatch, capsys):
    """An existing folder as --output ended in IsADirectoryError in the final rename, after the
    tokenizer was trained or the corpus assembled."""
    cli = importlib.import_module(f"tools.{tool}")

    def unread(*args, **kwargs):
        raise AssertionError("the work began")

    monkeypatch.setattr(cli, "iter_documents" if tool == "train_tokenizer" else "write_bundled_corpus", unread)
    (tmp_path / "out").mkdir()
    argv = ["--output", str(tmp_path / "out")] + (["--input", "c.jsonl"] if tool == "train_tokenizer" else [])
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    example = tmp_path / "out" / ("tokenizer.model" if tool == "train_tokenizer" else "corpus.jsonl")
    assert exit_.value.code == 2
    assert f"argument --output: {tmp_path / 'out'} is a folder: name the file to write, e.g. {example}" in (
        capsys.readouterr().err
    )
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and not any((tmp_path / "out").iterdir())


def truncated_gzip(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    whole = gzip.compress("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(200)).encode())
    path.write_bytes(whole[: len(whole) // 2])
    return path


def not_gzip(tmp_path):
    path = tmp_path / "plain.jsonl.gz"
    write_jsonl(path, [{"text": "not compressed at all"}])
    return path


@pytest.mark.parametrize("make", [truncated_gzip, not_gzip])
def test_broken_gzip_is_named(tmp_path, make, capsys):
    path = make(tmp_path)
    with pytest.raises(DataError, match=rf"{path.name} is not a complete gzip file"):
        list(iter_documents([path]))
    assert tokenizer_cli.main(["--input", str(path), "--output", str(tmp_path / "t.model"), "--vocab-size", "300"]) == 2
    assert path.name in capsys.readouterr().err
    assert (
        prepare_cli.main(
            [
                "--input",
                str(path),
                "--output",
                str(tmp_path / "ds"),
                "--vocab-size",
                "300",
                "--no-progress",
                "--workers",
                "1",
            ]
        )
        == 2
    )
    assert f"{path} is not a complete gzip file" in capsys.readouterr().err and not (tmp_path / "ds").exists()


def test_empty_validation_split_is_refused_at_preparation(tmp_path, tokenizer, documents):
    ids = tokenizer.encode_batch(documents[:3])
    with pytest.raises(DataError, match="validation split is empty"):
        write_dataset(ids, tmp_path / "ds", tokenizer, SEQ_LEN, val_fraction=1e-9, show_progress=False)
    assert not (tmp_path / "ds").exists()
    with pytest.warns(UserWarning, match="no validation split"):
        write_dataset(ids, tmp_path / "ds0", tokenizer, SEQ_LEN, val_fraction=0.0, show_progress=False)


def test_a_validation_split_that_must_be_empty_is_refused_before_the_corpus_is_read(tmp_path, monkeypatch):
    """prepare_data on one 60 MiB plain-text file tokenized all of it (12 s) and only then refused the empty
    validation split; files read whole hold one document each and documents are drawn for validation by
    index alone, so it is now refused before a tokenizer is trained or a document tokenized. The reference: the same corpus
    prepared by write_dataset from its documents, which finds the split empty (or not) after the work."""
    from pathlib import Path

    from pretrain.data import prepare as prepare_mod

    licenses = sorted(p for p in Path("/usr/share/common-licenses").iterdir() if p.is_file())[:3]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for path in licenses:
        (corpus / path.name).write_text(path.read_text())
    (corpus / "blank.txt").write_text("\n")  # read whole too: counts as a file, holds no document

    def refused_after_the_work(val_fraction: float) -> bool:
        tok = train_tokenizer(iter_documents([corpus]), tmp_path / "tok.model", vocab_size=400)
        try:
            write_dataset([tok.encode(d) for d in iter_documents([corpus])], tmp_path / "ref", tok, SEQ_LEN,
                          val_fraction=val_fraction, show_progress=False, overwrite=True)  # fmt: skip
        except DataError as err:
            return "validation split is empty" in str(err)
        return False

    fractions = (0.01, 0.05, 0.3)
    outcomes = [refused_after_the_work(f) for f in fractions]
    assert outcomes == [True, True, False]  # both sides are met here

    def no_work(*args, **kwargs):
        raise AssertionError("the work began")

    monkeypatch.setattr(prepare_mod, "train_tokenizer", no_work)
    monkeypatch.setattr(prepare_mod, "tokenize_documents", no_work)
    for fraction, refused in zip(fractions, outcomes):
        if refused:
            with pytest.raises(DataError, match=r"the validation split would be empty: the 4 input file\(s\), each "
                               rf"read as one document, hold at most 4 document\(s\).*--val-fraction={fraction}"):  # fmt: skip
                prepare_mod.prepare_corpus([corpus], tmp_path / "out", SEQ_LEN, val_fraction=fraction)
        else:
            with pytest.raises(AssertionError, match="the work began"):  # past the check
                prepare_mod.prepare_corpus([corpus], tmp_path / "out", SEQ_LEN, val_fraction=fraction)
    assert not (tmp_path / "out").exists()


def test_an_empty_training_split_is_named_at_preparation(tmp_path, tokenizer, capsys):
    """A corpus of one plain-text file is one document; at --val-fraction 0.9 it fell into validation
    and prepare_data wrote a dataset of 0 training sequences without a word (measured: GPL-3, 9571
    tokens, all in val), which the trainer refused only at its start. The preparation now warns,
    naming the cause and --format blocks; the dataset is still written (data.eval_sources scores it)."""
    from pathlib import Path

    corpus = tmp_path / "GPL-3.txt"
    corpus.write_text(Path("/usr/share/common-licenses/GPL-3").read_text())
    argv = ["--input", str(corpus), "--tokenizer", str(tokenizer.path), "--seq-len", str(SEQ_LEN), "--no-progress"]
    with pytest.warns(UserWarning, match=r"training split is empty: all 1 document\(s\) fell into validation .*"
                      r"--format blocks"):  # fmt: skip
        assert prepare_cli.main([*argv, "--output", str(tmp_path / "ds"), "--val-fraction", "0.9"]) == 0
    manifest = read_manifest(tmp_path / "ds")
    assert manifest["splits"]["train"]["sequences"] == 0 and manifest["splits"]["val"]["documents"] == 1
    assert prepare_cli.main([*argv, "--output", str(tmp_path / "ds2"), "--val-fraction", "0.1"]) == 2
    assert "--format blocks" in capsys.readouterr().err  # the other side: none in validation


def test_empty_validation_split_is_refused_at_training_start(tmp_path, tokenizer, documents, dataset):
    from pretrain.data.checks import check_trainable
    from pretrain.data.shards import read_manifest
    from pretrain.data.sources import Source

    with pytest.warns(UserWarning, match="training on it alone will be refused"):
        write_dataset(
            tokenizer.encode_batch(documents),
            tmp_path / "ds",
            tokenizer,
            SEQ_LEN,
            val_fraction=0.0,
            show_progress=False,
        )
    without = Source("only", tmp_path / "ds", 1.0, read_manifest(tmp_path / "ds"))
    with pytest.raises(DataError, match="'val' split of .* has no shard"):
        check_trainable([without])
    check_trainable([without, Source("with", dataset, 1.0, read_manifest(dataset))])  # as the warning says


def read_all(dataset, split="train"):
    loader = ShardLoader(dataset, split=split, batch_size=2, seq_len=SEQ_LEN, loop=False)
    return [b for b in loader]


def test_shards_of_another_preparation_are_refused(tmp_path, dataset, documents, tokenizer):
    """Same names and row counts, other bytes (another seed's shuffle): the manifest's hashes catch it."""
    other = tmp_path / "other"
    write_dataset(
        tokenizer.encode_batch(documents[::-1]),
        other,
        tokenizer,
        SEQ_LEN,
        val_fraction=0.2,
        seed=3,
        sequences_per_shard=8,
        rows_per_block=3,
        show_progress=False,
    )
    mixed = tmp_path / "mixed"
    shutil.copytree(dataset, mixed)
    ours, theirs = read_manifest(mixed)["splits"]["train"]["shards"], read_manifest(other)["splits"]["train"]["shards"]
    same_rows = [
        (a, b) for a, b in zip(ours, theirs) if a["sequences"] == b["sequences"] and a["sha256"] != b["sha256"]
    ]
    assert same_rows
    a, b = same_rows[0]
    shutil.copyfile(other / b["path"], mixed / a["path"])
    with pytest.raises(
        CorruptShardError,
        match=rf"{a['path']} is not the file its manifest.json lists .*: it is damaged or was written by another",
    ):
        read_all(mixed)
    read_all(dataset)  # the untouched dataset reads through


def test_a_shard_cut_short_in_its_end_padding_is_named_as_cut_short(tmp_path, dataset):
    """Every block still reads (the cut falls in the tar end padding): only the hash shows it."""
    cut = tmp_path / "cut"
    shutil.copytree(dataset, cut)
    shard = read_manifest(cut)["splits"]["train"]["shards"][0]
    data = (cut / shard["path"]).read_bytes()
    assert len(data) % tarfile.RECORDSIZE == 0
    (cut / shard["path"]).write_bytes(data[:-512])
    with pytest.raises(
        CorruptShardError,
        match=rf"{shard['path']} is not the file .*: it is cut short \({len(data) - 512} bytes, not a whole number "
        r"of 10240-byte tar records; an interrupted copy\?\): re-copy it",
    ):
        read_all(cut)


def test_token_ids_outside_the_vocabulary_are_refused(tmp_path, tokenizer, documents):
    ids = tokenizer.encode_batch(documents[:20])
    ids[5] = ids[5][:3] + [tokenizer.vocab_size + 7] + ids[5][3:]
    write_dataset(ids, tmp_path / "ds", tokenizer, SEQ_LEN, val_fraction=0.2, seed=3, show_progress=False)
    with pytest.raises(CorruptShardError, match=rf"token id {tokenizer.vocab_size + 7} >= the dataset's vocab_size"):
        read_all(tmp_path / "ds")
    assert np.iinfo(np.dtype(read_manifest(tmp_path / "ds")["token_dtype"])).max >= tokenizer.vocab_size + 7


def _corpus_folder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": f"document number {i} " * 5} for i in range(40)])
    return corpus


@pytest.mark.parametrize(
    "output, why",
    [
        (lambda c: c, "(is|holds) the input"),  # --overwrite deleted the corpus
        (lambda c: c.parent, "holds the input"),
        (lambda c: c / "prepared", "is inside the input folder"),  # a re-run read the shards as documents
    ],
    ids=["the corpus folder", "a folder holding it", "inside it"],
)
def test_an_output_over_the_corpus_is_refused_before_any_work(tmp_path, tokenizer, monkeypatch, output, why):
    """`--input corpus --output corpus --overwrite` prepared the dataset and then deleted the corpus
    folder in the final rename; an output inside the input folder was read back as documents by the next
    run over that folder. Both are refused before a document is read, the corpus untouched."""
    from pretrain.data import prepare as prepare_mod
    from pretrain.data import slices as slices_mod

    corpus = _corpus_folder(tmp_path)
    before = {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    def unread(*args, **kwargs):
        raise AssertionError("the corpus was read")

    monkeypatch.setattr(prepare_mod, "iter_documents", unread)
    monkeypatch.setattr(slices_mod, "iter_documents", unread)
    out = output(corpus)
    for inputs in ([corpus], [corpus / "a.jsonl"], [str(corpus / "*.jsonl")]):
        if why == "is inside the input folder" and inputs != [corpus]:
            continue  # a file or glob input: a folder beside it is fine
        with pytest.raises(DataError, match=f"--output {out} {why}"):
            prepare_mod.prepare_corpus(inputs, out, SEQ_LEN, tokenizer_path=tokenizer.path, overwrite=True)
        with pytest.raises(DataError, match=why):
            slices_mod.prepare_slice(inputs, out, tokenizer.path, 0, 2)
    assert {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()} == before


def test_an_output_beside_the_corpus_is_prepared(tmp_path, tokenizer):
    """The refusals above leave the usual layouts alone: a folder beside the corpus, and a folder
    inside the corpus folder when the input is a glob of its files."""
    from pretrain.data import prepare_corpus

    corpus = _corpus_folder(tmp_path)
    for inputs, out in (([corpus], tmp_path / "data"), ([str(corpus / "*.jsonl")], corpus / "prepared")):
        manifest = prepare_corpus(
            inputs, out, SEQ_LEN, tokenizer_path=tokenizer.path, val_fraction=0.2, show_progress=False
        )
        assert manifest["documents"] == 40 and (out / "manifest.json").is_file()


def test_overwrite_replaces_a_dataset_and_refuses_any_other_folder(tmp_path, tokenizer, capsys):
    """`--output data --overwrite` (meant: data/licenses) replaced the folder data/ whole, the
    datasets prepared in it before included (measured: data/english gone, the new shards in its
    place). --overwrite now replaces only a prepared dataset (a folder with manifest.json) and
    refuses any other non-empty folder before reading the corpus, naming what it holds; a dataset
    folder is still replaced, by the CLI and by a merge of slices."""
    corpus = _corpus_folder(tmp_path)
    data = tmp_path / "data"
    argv = ["--input", str(corpus), "--tokenizer", str(tokenizer.path), "--seq-len", str(SEQ_LEN)]
    argv += ["--val-fraction", "0.2", "--no-progress", "--workers", "1"]
    assert prepare_cli.main([*argv, "--output", str(data / "english")]) == 0
    english = {p: p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()}
    for out in (data, tmp_path):  # a folder of datasets; one holding the corpus is refused for that
        capsys.readouterr()
        assert prepare_cli.main([*argv, "--output", str(out), "--overwrite"]) == 2
        assert {p: p.read_bytes() for p in sorted(data.rglob("*")) if p.is_file()} == english
    err = capsys.readouterr().err
    assert "holds the input" in err
    (data / "notes.txt").write_text("mine\n")
    assert prepare_cli.main([*argv, "--output", str(data), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert f"--output {data} holds files (english, notes.txt) but is not a prepared dataset" in err
    assert (data / "notes.txt").is_file() and (data / "english" / "manifest.json").is_file()
    from pretrain.data.slices import prepare_slice

    with pytest.raises(DataError, match="is not a prepared dataset"):
        prepare_slice([corpus], data, tokenizer.path, 0, 1)
    assert prepare_cli.main([*argv, "--output", str(data / "english"), "--overwrite", "--seed", "1"]) == 0
    assert read_manifest(data / "english")["seed"] == 1  # a dataset is replaced


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("val_fraction", 1.0, r"val_fraction=1.0 must be in \[0, 1\) \(--val-fraction"),
        ("val_fraction", -0.1, r"val_fraction=-0.1 must be in \[0, 1\)"),
        ("seq_len", 0, r"seq_len=0 must be positive \(--seq-len\)"),
        ("sequences_per_shard", 0, r"sequences_per_shard=0 must be positive \(--sequences-per-shard\)"),
    ],
)
def test_bad_preparation_settings_are_refused_before_the_corpus_is_read(tmp_path, monkeypatch, option, value, message):
    """They were checked when the shards were about to be written: after the tokenizer had been
    trained on a sample drawn from a pass over the whole corpus."""
    from pretrain.data import prepare as prepare_mod

    corpus = _corpus_folder(tmp_path)

    def untrained(*args, **kwargs):
        raise AssertionError("the tokenizer was trained")

    monkeypatch.setattr(prepare_mod, "train_tokenizer", untrained)
    settings = {"seq_len": SEQ_LEN, "val_fraction": 0.1, "sequences_per_shard": 64, option: value}
    seq_len = settings.pop("seq_len")
    with pytest.raises(DataError, match=message):
        prepare_mod.prepare_corpus([corpus], tmp_path / "ds", seq_len, vocab_size=300, **settings)
    assert not (tmp_path / "ds").exists()


def test_a_file_as_output_is_refused_when_the_arguments_are_parsed(tmp_path, capsys):
    corpus = _corpus_folder(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        prepare_cli.main(["--input", str(corpus), "--output", str(corpus / "a.jsonl"), "--overwrite"])
    assert exit_.value.code == 2
    assert f"argument --output: {corpus / 'a.jsonl'} is a file, not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_cli.main(["--input", str(corpus), "--output", str(tmp_path / "ds"), "--seq-len", "0"])
    assert "argument --seq-len: 0 must be an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "inputs",
    [
        lambda c: [c, c / "a.jsonl"],  # a folder and a file in it
        lambda c: [str(c / "*.jsonl"), str(c / "a*")],  # overlapping globs
        lambda c: [c / "a.jsonl", (c / "a.jsonl").absolute()],  # relative and absolute spellings
    ],
    ids=["folder and file", "two globs", "two spellings"],
)
def test_a_file_named_twice_in_the_inputs_is_refused(tmp_path, monkeypatch, inputs, capsys):
    """An input file reached through two --input arguments was read twice: its documents were
    trained on twice and, drawn by document index, could fall into both splits (measured on the
    own-text recipe's corpus (docs/own-corpus.md) with --input english.jsonl licenses.jsonl: 3 of the 9 validation documents were
    also training documents)."""
    monkeypatch.chdir(tmp_path)
    corpus = _corpus_folder(tmp_path).relative_to(tmp_path)
    write_jsonl(corpus / "b.jsonl", [{"text": "another file " * 5}])
    args = [str(a) for a in inputs(corpus)]
    with pytest.raises(DataError, match=re.escape(f"a.jsonl is named twice in --input ('{args[0]}' and '{args[1]}')")):
        list(iter_documents(args))
    assert tokenizer_cli.main(["--input", *args, "--output", "t.model", "--vocab-size", "300"]) == 2
    assert prepare_cli.main(["--input", *args, "--output", "ds", "--vocab-size", "300", "--no-progress"]) == 2
    assert capsys.readouterr().err.count("is named twice in --input") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]
    # every file once: all documents, each once (the reference: the files' own lines)
    lines = sum(len((corpus / n).read_text().splitlines()) for n in ("a.jsonl", "b.jsonl"))
    assert len(list(iter_documents([corpus / "b.jsonl", str(corpus / "a*")]))) == lines


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_link_in_the_corpus_folder_to_one_of_its_files_is_read_once(tmp_path, link, capsys):
    """A corpus folder holding a link to one of its own files (latest.jsonl -> a.jsonl; /usr/share/doc
    holds 27, such as base-files/FAQ -> README) had that file read twice, under both names: a folder of
    a.jsonl (40 lines) and such a link prepared 80 documents, and at --val-fraction 0.1 all 8
    validation documents were training documents too. A file is now known by its device and inode:
    a folder reads it once (the link skipped, with a warning naming it), and two --input arguments
    naming it by its two names are refused, as one named twice is."""
    corpus = _corpus_folder(tmp_path)
    write_jsonl(corpus / "b.jsonl", [{"text": "another file " * 5}])
    if link == "symbolic":
        (corpus / "0-latest.jsonl").symlink_to("a.jsonl")  # sorted first: the file, not the link, is kept
    else:
        (corpus / "0-latest.jsonl").hardlink_to(corpus / "a.jsonl")
    lines = sum(len((corpus / n).read_text().splitlines()) for n in ("a.jsonl", "b.jsonl"))  # the reference
    with pytest.warns(UserWarning, match=re.escape(f"--input {corpus}: skipped 1 file(s) that are links")) as caught:
        assert len(list(iter_documents([corpus]))) == lines
    kept = "0-latest.jsonl (= a.jsonl)" if link == "symbolic" else "a.jsonl (= 0-latest.jsonl)"  # hard: the first
    assert kept in str(caught[0].message)
    out = tmp_path / "ds"
    args = ["--input", str(corpus), "--output", str(out), "--vocab-size", "300", "--val-fraction", "0.1"]
    assert prepare_cli.main([*args, "--no-progress"]) == 0
    assert read_manifest(out)["documents"] == lines
    named = [str(corpus / "a.jsonl"), str(corpus / "0-latest.jsonl")]
    with pytest.raises(DataError, match=re.escape(f"{named[0]} and {named[1]} are one file (")):
        list(iter_documents(named))
    capsys.readouterr()


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_during_preparation_leaves_no_temporary_folder(tmp_path, tokenizer, monkeypatch, workers, capsys):
    """SIGTERM (kill, scancel, a Slurm time limit) ended prepare_data at once, leaving the hidden
    temporary folder, with every shard written so far, beside --output (measured with kill -TERM 3.5 s
    into a run); a re-run writes a new one. It now exits through the atomic writers, which remove it.
    The signal is sent from inside the tokenizing, once shards are on disk."""
    import os
    import signal

    from pretrain.data import prepare as prepare_mod

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": f"document {i} " * 40} for i in range(400)])
    tokenize = prepare_mod.tokenize_documents
    written = []

    def tokenize_then_terminated(*args, **kwargs):
        for n, ids in enumerate(tokenize(*args, **kwargs)):
            if n == 300:
                written.extend(p for p in tmp_path.glob(".data.tmp-*/train/*.tar"))
                os.kill(os.getpid(), signal.SIGTERM)
            yield ids

    class Unhandled(Exception):
        """What the test's own handler raises: the tool did not install one (the default would end pytest)."""

    def unhandled(signum, frame):
        raise Unhandled

    monkeypatch.setattr(prepare_mod, "tokenize_documents", tokenize_then_terminated)
    before = signal.signal(signal.SIGTERM, unhandled)
    argv = ["--input", str(corpus), "--tokenizer", str(tokenizer.path), "--output", str(tmp_path / "data")]
    argv += ["--seq-len", "16", "--sequences-per-shard", "64", "--no-progress", "--workers", str(workers)]
    try:
        assert prepare_cli.main(argv) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is unhandled  # the tool's handler is removed again
    finally:
        signal.signal(signal.SIGTERM, before)
    said = re.sub(r"after \d+ s", "after N s", capsys.readouterr().err)
    assert said.startswith(
        f"error: stopped by SIGTERM (scancel, a time limit or preemption) after N s: the unfinished preparation "
        f"was removed and {tmp_path / 'data'} is as it was before."
    )
    assert written, "no shard was on disk when the signal came"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # neither the output nor a temporary


def test_a_plain_text_file_too_large_for_one_document_is_refused(tmp_path, monkeypatch, capsys):
    """A plain-text file is one document, so a corpus kept in one .txt (a wiki dump) was read and
    tokenized whole: ~80 bytes of memory per character (a 5.6 MB document took 470 MB), an
    out-of-memory kill minutes in for a corpus of gigabytes. Above MAX_TEXT_DOCUMENT_BYTES it is
    refused, naming the file and --format blocks; the limit is shrunk here to keep the test small."""
    from pretrain.data import corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "MAX_TEXT_DOCUMENT_BYTES", 4096)
    paragraph = "a line of a paragraph\n" * 9
    text = "\n".join([paragraph] * 40)  # 40 blank-line-separated paragraphs, > 4096 bytes
    assert len(text.encode()) > 4096
    (tmp_path / "wiki.txt").write_text(text)
    with gzip.open(tmp_path / "wiki.txt.gz", "wt") as fh:
        fh.write(text)
    (tmp_path / "fits.txt").write_text(text[:4096])
    for name in ("wiki.txt", "wiki.txt.gz"):
        with pytest.raises(
            DataError, match=rf"{name} holds more than 4,096 bytes of text, read as one document .*--format blocks"
        ):
            list(iter_documents([tmp_path / name]))
        assert list(iter_documents([tmp_path / name], "blocks")) == [paragraph] * 40  # the fix it names
    assert list(iter_documents([tmp_path / "fits.txt"])) == [text[:4096]]
    # --format blocks on text without blank lines read it whole all the same, with no limit
    (tmp_path / "lines.txt").write_text(paragraph * 40)
    with pytest.raises(DataError, match=r"lines.txt holds a block of more than 4,096 bytes without a blank line"):
        list(iter_documents([tmp_path / "lines.txt"], "blocks"))
    argv = ["--input", str(tmp_path / "wiki.txt"), "--output", str(tmp_path / "ds"), "--vocab-size", "300"]
    assert prepare_cli.main([*argv, "--no-progress"]) == 2
    assert "wiki.txt holds more than" in capsys.readouterr().err and not (tmp_path / "ds").exists()


def test_a_tokenizer_can_give_pieces_to_part_of_the_characters(tmp_path, capsys):
    """A byte-pair tokenizer gave every distinct character a piece, and refused a vocabulary with fewer
    slots, with no way to cover part of them (measured: /usr/share/man, 1,411 distinct characters in
    many scripts, needed --vocab-size >= 1672, refused after reading it all). --character-coverage
    (sentencepiece's option) now gives pieces to the commonest characters only, the rest written as
    bytes; the refusal names it with the size it needs. Reference: the pieces sentencepiece itself made."""
    import random

    import sentencepiece as spm

    rng = random.Random(0)
    han = [chr(0x4E00 + i) for i in range(700)]  # Zipf-like: a long tail of rare characters, as real text
    lines = ["".join(rng.choices(han, weights=[1 / (r + 1) for r in range(700)], k=30)) for _ in range(300)]
    lines += [f"line {i} of the English part" for i in range(50)]
    corpus = tmp_path / "many.txt"
    corpus.write_text("\n".join(lines) + "\n")
    distinct = len(set("".join(lines)))
    assert distinct > 500
    model = tmp_path / "t.model"
    argv = ["--input", str(corpus), "--output", str(model), "--vocab-size", str(distinct + 260)]
    assert tokenizer_cli.main(argv) == 2
    err = capsys.readouterr().err
    needed = re.search(r"--character-coverage 0.9995 needs --vocab-size >= (\d+)", err)
    assert f"it has {distinct:,} distinct characters, so pass --vocab-size >= {distinct + 261}" in err and needed
    needed = int(needed.group(1))
    assert needed < distinct + 260
    assert tokenizer_cli.main([*argv[:-1], str(needed - 1), "--character-coverage", "0.9995"]) == 2
    assert "a --character-coverage below 0.9995 needs fewer" in capsys.readouterr().err and not model.exists()
    assert tokenizer_cli.main([*argv[:-1], str(needed), "--character-coverage", "0.9995"]) == 0
    sp = spm.SentencePieceProcessor(model_file=str(model))
    chars = [
        sp.id_to_piece(i)
        for i in range(sp.get_piece_size())
        if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i))
        and sp.id_to_piece(i) not in ("\n", "")
        and len(sp.id_to_piece(i)) == 1
    ]
    assert len(chars) == needed - 261 < distinct  # the newline's piece and 4 specials + 256 bytes aside
    text = corpus.read_text()
    rare = [c for c in set(text) if c not in chars and c not in " \n"]
    for c in rare:  # written as bytes (after the "▁" before each text)
        ids = [i for i in sp.encode(c) if sp.id_to_piece(i) != "▁"]
        assert ids and all(sp.is_byte(i) for i in ids), c
    assert sp.decode(sp.encode(text)) == text
    out = str(tmp_path / "x")
    for tool, extra, said in (
        (tokenizer_cli, ["--character-coverage", "0"], "argument --character-coverage: 0 must be a number in (0, 1]"),
        (prepare_cli, ["--character-coverage", "0.99", "--tokenizer", str(model)], "--tokenizer is used as it is"),
    ):
        with pytest.raises(SystemExit):
            tool.main(["--input", str(corpus), "--output", out, *extra])
        assert said in capsys.readouterr().err


def test_a_jsonl_record_or_parquet_cell_too_large_for_one_document_is_refused(tmp_path, monkeypatch, capsys):
    """A plain-text file over MAX_TEXT_DOCUMENT_BYTES was refused, a JSONL line or Parquet cell of any size
    read and tokenized whole (a JSONL line read whole even before its JSON was parsed, however long; one
    without a line end, the whole file): prepare_data on a JSONL file whose second record held 100 MB of
    text peaked at 3.8 GB resident (unigram tokenizer, 34 s); now it is refused in 0.4 s. Both are now
    refused, naming the file and the record, before the record is held whole (a line) or turned into Python
    text (a Parquet batch); a record whose text fits passes however its JSON escapes it. The limit is shrunk
    here to keep the test small."""
    from pretrain.data import corpus as corpus_mod

    monkeypatch.setattr(corpus_mod, "MAX_TEXT_DOCUMENT_BYTES", 4096)
    fits, over = "x" * 4096, "x" * 4097
    escaped = "\u0416" * 2048  # 4096 bytes of UTF-8, 12,288 of JSON as json.dumps writes it (\\u0416 each)
    lines = [json.dumps({"text": t}) for t in ("a", fits, escaped, over, "b")]
    assert len(lines[2]) > 3 * 4096
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"c.jsonl:4: the document holds 4,097 bytes of text, more than the 4,096"):
        list(iter_documents([tmp_path / "c.jsonl"]))
    (tmp_path / "ok.jsonl").write_text("\n".join(lines[:3]) + "\n")
    assert list(iter_documents([tmp_path / "ok.jsonl"])) == ["a", fits, escaped]
    # a line longer than 4 x the limit is refused before it is read whole: here one with no line end at all
    with open(tmp_path / "endless.jsonl.gz", "wb") as raw, gzip.open(raw, "wb") as fh:
        fh.write(b'{"text": "a"}\n' + b'{"text": "' + b"y" * 100_000)
    with pytest.raises(DataError, match=r"endless.jsonl.gz:2: the line is longer than 16,384 bytes \(4 x the 4,096 "):
        list(iter_documents([tmp_path / "endless.jsonl.gz"]))
    # --format blocks held a line whole however long, before its size was compared
    (tmp_path / "one_line.txt").write_bytes(b"z" * 100_000)
    with pytest.raises(DataError, match=r"one_line.txt holds a block of more than 4,096 bytes without a blank line"):
        list(iter_documents([tmp_path / "one_line.txt"], "blocks"))

    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["a"] * 1500 + [fits, "\u00e9" * 2049]  # rows 1,501 and 1,502: 4,096 and 4,098 bytes
    for name, column in [
        ("plain", pa.array(texts)),
        ("dict", pa.array(texts).dictionary_encode()),
        ("large", pa.array(texts, pa.large_string())),
    ]:
        pq.write_table(pa.table({"body": column}), tmp_path / f"{name}.parquet", row_group_size=700)
        with pytest.raises(
            DataError,
            match=rf"{name}.parquet: row 1,502 \(counting from 1\) of column 'body': the document holds 4,098",
        ):
            list(iter_documents([tmp_path / f"{name}.parquet"], text_field="body"))
        pq.write_table(pa.table({"body": column[:1501]}), tmp_path / f"{name}_ok.parquet", row_group_size=700)
        assert list(iter_documents([tmp_path / f"{name}_ok.parquet"], text_field="body")) == texts[:1501]
    argv = ["--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "ds"), "--vocab-size", "300"]
    assert prepare_cli.main([*argv, "--no-progress"]) == 2
    assert "c.jsonl:4: the document holds 4,097 bytes" in capsys.readouterr().err and not (tmp_path / "ds").exists()
