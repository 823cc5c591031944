"""Hostile or broken inputs to the data tools and the loader: each is refused with the file
named, nothing half-written; foreign shards and out-of-vocabulary ids are caught."""

from __future__ import annotations

import gzip
import importlib
import json
import shutil
import tarfile

import numpy as np
import pytest

from data_helpers import SEQ_LEN  # noqa: E402
from pretrain.data import DataError, ShardLoader, iter_documents, train_tokenizer, write_dataset
from pretrain.data.shards import CorruptShardError, read_manifest
from tools import prepare_data as prepare_cli
from tools import train_tokenizer as tokenizer_cli


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


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


def test_empty_validation_split_is_refused_at_training_start(tmp_path, tokenizer, documents):
    from pretrain.data.checks import check_trainable
    from pretrain.data.shards import read_manifest
    from pretrain.data.sources import Source

    with pytest.warns(UserWarning):
        write_dataset(
            tokenizer.encode_batch(documents),
            tmp_path / "ds",
            tokenizer,
            SEQ_LEN,
            val_fraction=0.0,
            show_progress=False,
        )
    with pytest.raises(DataError, match="'val' split of .* has no shard"):
        check_trainable([Source("only", tmp_path / "ds", 1.0, read_manifest(tmp_path / "ds"))])


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
