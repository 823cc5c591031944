"""Corpus readers, prepare_data (determinism, packing, bad input) and the embedded dataset."""

from __future__ import annotations

import gzip
import json
import re
import signal
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from data_helpers import SEQ_LEN, write_jsonl  # noqa: E402
from pretrain import progress_bars
from pretrain.config import DataConfig, SyntheticConfig
from pretrain.data import (
    CorpusStats,
    DataError,
    ShardLoader,
    Tokenizer,
    iter_documents,
    load_probes,
    prepare_corpus,
    prepare_embedded_dataset,
    read_manifest,
    train_tokenizer,
    write_dataset,
)
from pretrain.data import prepare as prepare_mod
from pretrain.data import tokenizer as tokenizer_mod
from pretrain.data.bundled_text import python_docs
from pretrain.data.input_files import resolve_files
from pretrain.data.prepare import check_output_dir
from pretrain.data.shards import read_blocks
from pretrain.data.synthetic import ATTRIBUTES, build_fact_world
from tools import prepare_data as prepare_cli
from tools import train_tokenizer as tokenizer_cli


def recorded_bars(monkeypatch) -> dict[str, list[int]]:
    """prepare's progress bars, each one's positions after every update, by their descriptions."""
    bars: dict[str, list[int]] = {}

    class Recorded(progress_bars.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars[kwargs["desc"]] = self.positions = []

        def update(self, n=1):
            super().update(n)
            self.positions.append(self.n)

    monkeypatch.setattr(progress_bars, "tqdm", Recorded)
    return bars


def shard_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_bad_bytes_and_empty_documents_are_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait\n")  # latin-1, not UTF-8
    (tmp_path / "b.txt").write_bytes(b"   \n\n")
    (tmp_path / "c.txt").write_bytes(b"first block\nstill first\n\n\n\nsecond \xff block\n")
    rows = [{"text": "one"}, {"text": ""}, {"text": "two \udcff".encode("utf-8", "surrogatepass").decode("latin-1")}]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    stats = CorpusStats()
    docs = list(iter_documents([tmp_path / "a.txt", tmp_path / "b.txt"], "text", stats=stats))
    assert docs == ["caf\ufffd au lait\n"] and (stats.non_utf8_documents, stats.empty_documents) == (1, 1)
    stats = CorpusStats()
    docs = list(iter_documents([tmp_path / "c.txt"], "blocks", stats=stats))
    assert docs == ["first block\nstill first\n", "second \ufffd block\n"] and stats.non_utf8_documents == 1
    stats = CorpusStats()
    docs = list(iter_documents([tmp_path / "d.jsonl.gz"], stats=stats))
    assert len(docs) == 2 and docs[0] == "one" and stats.empty_documents == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_preparation_shows_how_much_of_the_input_is_read(tmp_path, tokenizer, monkeypatch, workers):
    """prepare_data's only bar counted tokens, with no total: a 100 MB corpus ran 2 min 24 s showing
    'prepare: 28.1Mtok' and no sign of how far it was. A second bar now counts the input's bytes (as
    stored, compressed or not) against their total, moved as each document is packed, not as it is
    read ahead for the tokenizer processes; the reference is the files' sizes."""
    from pretrain.data.corpus import input_bytes

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": f"document {i} " * 30} for i in range(300)])
    with gzip.open(corpus / "b.jsonl.gz", "wt") as fh:
        fh.write("".join(json.dumps({"text": f"packed {i} " * 30}) + "\n" for i in range(300)))
    (corpus / "c.txt").write_text("a plain text document\n" * 50)
    (corpus / "d.txt").write_text("")  # an empty document last: not yielded, but its file is read
    files = resolve_files([corpus])
    total = sum(f.stat().st_size for f in files)
    assert input_bytes(files) == total
    read: list[int] = []
    docs = list(iter_documents([corpus], progress=read.append))
    assert len(read) == len(docs) == 601 and read == sorted(read) and read[-1] == total
    assert read[299] <= (corpus / "a.jsonl").stat().st_size < read[300]  # the last of a.jsonl; the first of b

    bars = recorded_bars(monkeypatch)
    prepare_mod.prepare_corpus(
        [corpus], tmp_path / "ds", SEQ_LEN, tokenizer_path=tokenizer.path, val_fraction=0.1, workers=workers
    )
    assert bars["read"][-1] == total and bars["read"] == sorted(bars["read"]) and len(bars["read"]) > 600
    assert sorted(set(bars["read"]))[:-1] == sorted(set(read))[:-1]  # document by document, then filled


@pytest.mark.parametrize("stem", ["authors", "an author's notes"])  # the second: quoted for the shell
@pytest.mark.parametrize("suffix", ["", ".gz", ".xz"])
def test_text_that_is_not_utf8_is_warned_of_naming_the_file_and_the_conversion(tmp_path, suffix, stem):
    """A Latin-1 file (as /usr/share/doc/ed/AUTHORS: 'Fran\\xe7ois Pinard') lost each accented letter to
    U+FFFD, said only as a count in the stats line. One warning now names the files, how many documents,
    and a command that converts the file in place; run as written, the folder reads as the text was meant
    (the reference: its bytes decoded as Latin-1), once. The command named until 2026-12-07 wrote a copy
    beside the file (`iconv ... authors.txt > authors.utf8.txt`), which the folder then read beside the
    original: the document twice, once still broken; for /usr/share/doc/ed/changelog.gz it converted the
    gzip bytes into a file no reader could open. A name with a space or a quote is quoted for the shell (it
    was not: iconv read two files, and the output went to a file named by the name's first word)."""
    import shlex
    import subprocess

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    latin1 = "Fran\u00e7ois Pinard wrote na\u00efve caf\u00e9 code.\n" * 3
    name = stem + ".txt" + suffix
    compress = {"": lambda b: b, ".gz": gzip.compress, ".xz": __import__("lzma").compress}[suffix]
    (corpus / name).write_bytes(compress(latin1.encode("latin-1")))
    (corpus / "fine.txt").write_text("plain UTF-8 text, caf\u00e9 included\n")
    with pytest.warns(
        UserWarning, match=rf"1 document\(s\) in 1 file\(s\) \(.*{re.escape(name)}\) held text that is not UTF-8"
    ) as seen:
        docs = list(iter_documents([corpus]))
    assert docs[0] == latin1.replace("\u00e7", "\ufffd").replace("\u00ef", "\ufffd").replace("\u00e9", "\ufffd")
    (message,) = [str(w.message) for w in seen]
    command = message.split("convert such a file in place, e.g. ")[1]
    path, temporary = shlex.quote(str(corpus / name)), shlex.quote(str(corpus / f"{name}.utf8"))
    tool = {"": None, ".gz": "gzip", ".xz": "xz"}[suffix]
    pipe = f"{tool} -dc {path} | iconv -f latin1 -t UTF-8 | {tool} -c" if tool else f"iconv -f latin1 -t UTF-8 {path}"
    assert command == f"{pipe} > {temporary} && mv {temporary} {path}"
    subprocess.run(["bash", "-c", command], check=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(iter_documents([corpus])) == [latin1, "plain UTF-8 text, caf\u00e9 included\n"]


@pytest.mark.filterwarnings("ignore:--val-fraction=0")
def test_lone_surrogate_escapes_are_replaced_and_counted(tmp_path, tokenizer):
    """JSON may escape half of a UTF-16 pair; sentencepiece cannot encode it, so it must not get there."""
    corpus = tmp_path / "s.jsonl"
    corpus.write_bytes(
        b'{"text": "broken \\ud83d emoji"}\n'  # a lone high surrogate
        b'{"text": "whole \\ud83d\\ude00 emoji"}\n'  # a valid pair: one character, nothing to repair
        b'{"text": "\\udc00 and caf\xe9"}\n'  # a lone surrogate and a latin-1 byte: counted once
    )
    stats = CorpusStats()
    docs = list(iter_documents([corpus], stats=stats))
    assert docs == ["broken \ufffd emoji", "whole \U0001f600 emoji", "\ufffd and caf\ufffd"]
    assert stats.non_utf8_documents == 2
    manifest = prepare_corpus(
        [corpus], tmp_path / "ds", 32, tokenizer_path=tokenizer.path, val_fraction=0.0, show_progress=False
    )
    assert manifest["documents"] == 3 and manifest["stats"]["non_utf8_documents"] == 2


def test_directory_input_skips_hidden_files_and_folders(tmp_path):
    """As `huggingface-cli download --local-dir` leaves it: metadata under .cache/ beside the data."""
    root = tmp_path / ".datasets" / "corpus"  # a hidden folder above the input does not count
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    meta = root / ".cache" / "huggingface" / "download" / "data"
    meta.mkdir(parents=True)
    (meta / "train.jsonl.metadata").write_text("0123abcd\n1712345678.9\n")
    (root / ".hidden.jsonl").write_text('{"text": "hidden"}\n')
    assert resolve_files([root]) == [root / "data" / "train.jsonl"]
    assert list(iter_documents([root])) == ["one", "two"]


def test_directory_input_skips_binary_files_with_a_warning(tmp_path, tokenizer):
    """The own-text recipe (docs/own-corpus.md) keeps corpus/tokenizer.model beside the corpus: --input corpus/ read the
    model's protobuf bytes as a text document. A file named itself is refused
    (test_a_binary_file_named_itself_is_refused)."""
    import shutil

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one document\n")
    model = Path(shutil.copyfile(tokenizer.path, tmp_path / "corpus" / "tokenizer.model"))
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\) that are not text \(tokenizer.model"):
        assert resolve_files([tmp_path / "corpus"]) == [tmp_path / "corpus" / "a.txt"]
    with pytest.raises(DataError, match="is not text"):
        resolve_files([model])


def test_a_folder_lists_its_files_in_the_order_and_with_the_skips_of_rglob(tmp_path, monkeypatch):
    """resolve_files listed a folder with sorted(Path.rglob) and a stat and a relative_to per file (0.1 ms
    a file; 20,000 files, 2 s per pass, 4 passes per preparation); it now walks it with one scandir per
    folder. The order decides document ids and shards, so it must stay the reference's, the old
    listing: names that sort differently as strings and as paths, hidden files and folders, a symbolic
    link to a folder (not entered), a broken link. A folder that cannot be listed was skipped by rglob
    without a word, its documents missing from the dataset; it is now an error naming it."""
    import os

    root = tmp_path / "corpus"
    for name in ("a/b.txt", "a.txt", "a-b/c.txt", "A/z.txt", "a/.hidden/x.txt", ".cache/y.txt", "b/.dot.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"the text of {name}\n")
    (root / "deep" / "er" / "est").mkdir(parents=True)
    (root / "deep" / "er" / "est" / "d.txt").write_text("deep\n")
    (root / "linked").symlink_to(root / "a", target_is_directory=True)
    (root / "broken.txt").symlink_to(tmp_path / "nowhere")
    (root / "to-outside.txt").symlink_to(tmp_path / "outside.txt")
    (tmp_path / "outside.txt").write_text("outside\n")
    reference = sorted(
        f for f in root.rglob("*") if f.is_file() and not any(p.startswith(".") for p in f.relative_to(root).parts)
    )
    assert [f.relative_to(root).as_posix() for f in reference] == [
        "A/z.txt", "a/b.txt", "a-b/c.txt", "a.txt", "deep/er/est/d.txt", "to-outside.txt"
    ]  # fmt: skip
    with pytest.warns(UserWarning, match=r"skipped 1 symbolic link\(s\) that lead to no file \(broken.txt"):
        assert resolve_files([root]) == reference
    scandir = os.scandir

    def locked(path):
        if Path(path).name == "er":
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", locked)
    with pytest.raises(DataError, match=re.escape(f"cannot list {root / 'deep' / 'er'} (Permission denied)")):
        resolve_files([root])


def test_a_folder_names_its_broken_symbolic_links(tmp_path):
    """A symbolic link in a folder whose target is gone (measured: /etc/modules-load.d/modules.conf ->
    ../modules on this machine, or a link to an unmounted drive) was skipped without a word, its text
    missing from the dataset. It is still skipped (a listing stays the files that can be read), with one
    warning naming the links and their targets."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("a document\n")
    (root / "broken.txt").symlink_to("../nowhere.txt")
    (root / "sub" / "gone.txt").symlink_to("/mnt/unmounted/gone.txt")
    with pytest.warns(UserWarning) as caught:
        assert resolve_files([root]) == [root / "a.txt"]
    said = [str(w.message) for w in caught if "symbolic link" in str(w.message)]
    assert said == [
        f"--input {root}: skipped 2 symbolic link(s) that lead to no file (broken.txt -> ../nowhere.txt, "
        "sub/gone.txt -> /mnt/unmounted/gone.txt): restore their targets to read them, or remove the links"
    ]
    pattern = f"{root}/**/*.txt"  # a glob pattern skipped them without a word too
    with pytest.warns(UserWarning) as caught:
        assert resolve_files([pattern]) == [root / "a.txt"]
    assert [str(w.message) for w in caught if "symbolic link" in str(w.message)] == [
        f"--input {pattern}: skipped 2 symbolic link(s) that lead to no file ({root / 'broken.txt'} -> "
        f"../nowhere.txt, {root / 'sub' / 'gone.txt'} -> /mnt/unmounted/gone.txt): restore their targets to "
        "read them, or remove the links"
    ]
    (tmp_path / "nowhere.txt").write_text("found again\n")  # its target restored, the link is read
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_files([root]) == [root / "a.txt", root / "broken.txt"]
    assert [str(w.message) for w in caught if "symbolic link" in str(w.message)] == [
        f"--input {root}: skipped 1 symbolic link(s) that lead to no file (sub/gone.txt -> "
        "/mnt/unmounted/gone.txt): restore their targets to read them, or remove the links"
    ]


def test_a_folder_names_its_symbolic_links_to_folders_outside_it(tmp_path):
    """Symbolic links to folders are not entered (as find and grep -r, and a link back up is no loop). Those
    leading out of the folder were skipped without a word, their files missing from the corpus
    (/usr/share/doc/git/contrib/hooks -> ../../../git-core/contrib/hooks); they are now named once, with
    the fix. Links to a folder inside it (44 in /usr/share/doc, such as g++ -> cpp) lose nothing and are
    not named, nor is a link to the folder itself."""
    root = tmp_path / "corpus"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.txt").write_text("inside\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "y.txt").write_text("outside\n")
    (root / "again").symlink_to("a", target_is_directory=True)
    (root / "a" / "self").symlink_to("..", target_is_directory=True)
    (root / "more").symlink_to("../elsewhere", target_is_directory=True)
    (root / "a" / "up").symlink_to("../..", target_is_directory=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_files([root]) == [root / "a" / "x.txt"]
    assert [str(w.message) for w in caught] == [
        f"--input {root}: did not enter 2 symbolic link(s) to folders outside it (a/up -> ../.., more -> "
        "../elsewhere), as find and grep -r do not: to read their files, name the folders they lead to in --input too"
    ]
    with pytest.warns(UserWarning, match="did not enter 2 symbolic link"):  # the fix reads them
        assert resolve_files([root, tmp_path / "elsewhere"]) == [root / "a" / "x.txt", tmp_path / "elsewhere" / "y.txt"]


def test_a_folder_stats_each_file_once(tmp_path, monkeypatch):
    """Listing a folder stat'ed each file twice: for its links within the folder (_without_links) and
    again for files reached by two arguments; a third time where it held an archive (the bytes beside
    it), and a fourth where it held a link to a file (an lstat, to choose which name of a file to keep):
    /usr/share/doc, 4,257 files, 12,677 stats and 4,284 lstats. The stat made once now serves all, and
    only the names of one file are lstat'ed (/usr/share/doc: 4,287 and 51); the reference counts
    Path.stat's calls per file."""
    import collections

    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for name in ("a.txt", "b.txt", "sub/c.txt"):
        (root / name).write_text(f"{name}\n")
    (root / "link.txt").symlink_to("a.txt")
    (root / "old.tar.gz").write_bytes(b"an archive, skipped")
    calls: collections.Counter = collections.Counter()
    stat = Path.stat

    def counted(self, *, follow_symlinks=True):
        calls[self.name, "stat" if follow_symlinks else "lstat"] += 1
        return stat(self, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(Path, "stat", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the link and the archive skipped
        files = resolve_files([root])
    assert files == [root / "a.txt", root / "b.txt", root / "sub" / "c.txt"]
    assert {key: n for key, n in calls.items() if key[0] not in ("corpus", "manifest.json")} == {
        ("a.txt", "stat"): 1, ("b.txt", "stat"): 1, ("c.txt", "stat"): 1, ("link.txt", "stat"): 1,
        ("old.tar.gz", "stat"): 1, ("a.txt", "lstat"): 1, ("link.txt", "lstat"): 1,
    }  # fmt: skip


def test_a_binary_file_named_itself_is_refused(tmp_path, tokenizer):
    """A file that is not text was skipped when a folder or glob reached it, but read when named itself:
    `smf_finetune --data model.safetensors` finetuned on the bytes of the weights. Named itself it is now
    refused, naming it (the detection is the folder listing's: a NUL byte in its first 8 KiB)."""
    with pytest.raises(DataError, match=re.escape(f"--data {tokenizer.path} is not text (a NUL byte in its first")):
        resolve_files([tokenizer.path], option="--data")
    packed = tmp_path / "manual.pdf.gz"
    packed.write_bytes(gzip.compress(b"%PDF-1.4\n\0\0binary"))
    with pytest.raises(
        DataError, match=re.escape(f"--input {packed} is not text (a NUL byte in its first 8 KiB, decompressed")
    ):
        resolve_files([packed])


@pytest.mark.parametrize("trains_tokenizer", [False, True])
def test_a_preparation_lists_its_input_folder_once(tmp_path, tokenizer, monkeypatch, trains_tokenizer):
    """prepare_corpus listed and checked the input folder in every pass over it: the output check, the
    probe for an empty corpus, the tokenizer's sample and the tokenizing, 3 or 4 times (a folder of
    10,000 one-document files: 6.7 to 7.9 s, 4.6 to 4.8 s once listed once, tools/bench_data.py's folder
    round). It is now listed once, and the dataset is the same."""
    from pretrain.data import corpus as corpus_mod

    root = tmp_path / "corpus"
    for i in range(30):
        (root / f"{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"{i % 3}" / f"{i:03d}.txt").write_text(f"document {i} of a folder of one-document files\n")
    settings = dict(val_fraction=0.2, show_progress=False)
    if trains_tokenizer:
        settings["vocab_size"] = 300
    else:
        settings["tokenizer_path"] = tokenizer.path
    calls = []

    def counted(*args, **kwargs):
        calls.append(args)
        return resolve_files(*args, **kwargs)

    monkeypatch.setattr(corpus_mod, "resolve_files", counted)
    monkeypatch.setattr(prepare_mod, "resolve_files", counted)
    manifest = prepare_mod.prepare_corpus([root], tmp_path / "ds", SEQ_LEN, **settings)
    assert len(calls) == 1
    assert manifest["documents"] == 30


def test_a_folder_of_records_and_plain_text_files_is_warned_of(tmp_path, tokenizer):
    """A Hugging Face dataset downloaded with --local-dir keeps its card, README.md, beside
    data/*.jsonl or *.parquet: --input of the folder read the card (YAML front matter and all) as one
    more training document, without a word. It is still read (a folder may mix them on purpose), with
    a warning naming it and a glob that leaves it out, which reads the records alone. Under --format
    text every file is one document, as it means: no warning (it claimed JSONL files were read)."""
    root = tmp_path / "hf"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (root / "README.md").write_text("---\nlicense: mit\n---\n# Dataset card\n")
    with pytest.warns(UserWarning, match=r"holds 1 plain-text file\(s\) \(README.md\), each read as one document"):
        assert len(list(iter_documents([root]))) == 3
    glob = f"{root}/**/*.jsonl"
    with pytest.warns(UserWarning, match=re.escape(f"(e.g. '{glob}')")):
        resolve_files([root])
    assert list(iter_documents([glob])) == ["one", "two"]
    with warnings.catch_warnings():  # --format text reads every file as one document, as it says
        warnings.simplefilter("error")  # (it claimed the records and advised a glob of them)
        assert len(list(iter_documents([root], "text"))) == 2
        check_output_dir(tmp_path / "ds", [root], files=resolve_files([root], fmt="text"))
        prepare_mod.prepare_corpus([root], tmp_path / "ds", 8, tokenizer_path=tokenizer.path, fmt="text",
                                   val_fraction=0.5, show_progress=False)  # fmt: skip
    (root / "README.md").unlink()
    (root / "notes.txt").write_text("a text corpus of text files only is not warned of\n")
    (root / "data" / "train.jsonl").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(iter_documents([root]))) == 1


def test_a_folder_of_documents_with_a_few_json_files_names_them_and_format_text(tmp_path):
    """/usr/share/doc holds 4,128 text files and 66 JSON files (nodejs/api/*.json.gz, each one JSON
    object over many lines). --input /usr/share/doc warned that 'besides its JSONL/Parquet files it holds
    4128 plain-text file(s)' and advised a glob of the JSON files, then was refused at the first of them
    with a jq conversion alone: no word of --format text, which reads every file as one document, as
    such a folder means. The warning now names the few record files and --format text, and so does the
    error."""
    from pretrain.data.corpus import check_record_files

    root = tmp_path / "doc"
    (root / "api").mkdir(parents=True)
    for name in ("README", "changelog", "NEWS"):
        (root / name).write_text(f"the {name} of a package\n")
    (root / "api" / "fs.json").write_text('{\n  "source": "doc/api/fs.md",\n  "modules": []\n}\n')
    with pytest.warns(UserWarning) as caught:
        files = resolve_files([root])
    assert [str(w.message) for w in caught] == [
        f"--input {root}: besides its 3 plain-text files it holds 1 JSONL/Parquet file(s) (api/fs.json), read as "
        "records (a document per line or row, from the field --text-field); if they are documents like the "
        "others, pass --format text to read every file whole"
    ]
    with pytest.raises(DataError, match=r"api/fs.json:1: the file is a JSON object written over several lines.*jq -c "
                       r"\..*; or, if each file is one document \(a folder of documentation\), pass --format text$"):  # fmt: skip
        check_record_files(files)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(iter_documents([root], "text"))) == 4


def test_a_folder_input_skips_data_prepared_inside_it(tmp_path, tokenizer):
    """A dataset may be prepared inside the corpus folder from a glob of its files (allowed: the glob
    does not reach it), or sliced there. The next run over the folder read the dataset's manifest.json
    and the slice's slice.json as JSONL and stopped ('manifest.json:1: ... not JSON Lines'). Prepared
    data inside an input folder is skipped with one warning naming it; the corpus reads as before."""
    from pretrain.data.slices import prepare_slice

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(f'{{"text": "document {i} of the corpus"}}\n' for i in range(30)))
    alone = list(iter_documents([corpus]))
    prepare_corpus([str(corpus / "*.jsonl")], corpus / "prepared", 16, tokenizer_path=tokenizer.path,
                   val_fraction=0.2, show_progress=False)  # fmt: skip
    prepare_slice([str(corpus / "*.jsonl")], corpus / "big", tokenizer.path, 0, 1)
    assert (corpus / "prepared" / "manifest.json").is_file() and (corpus / "big.slices").is_dir()
    with pytest.warns(UserWarning, match=r"skipped the prepared data inside it \(big.slices, prepared\)"):
        assert list(iter_documents([corpus])) == alone


def test_a_prepared_dataset_named_as_the_corpus_is_refused_naming_its_corpus(tmp_path, tokenizer, capsys):
    """--input data/english (the prepared dataset, not the corpus) said only that the folder holds no
    files, after a warning that it skipped the prepared data inside it ('.'). It is now refused naming
    what the folder is, the corpus its manifest records and data.dir to train on it."""
    corpus = tmp_path / "english.jsonl"
    corpus.write_text("".join(f'{{"text": "document {i} of the corpus"}}\n' for i in range(30)))
    data = tmp_path / "data" / "english"
    prepare_corpus([corpus], data, 16, tokenizer_path=tokenizer.path, val_fraction=0.2, show_progress=False)
    expected = (
        f"--input {data} is a prepared dataset (shards and a manifest.json), not corpus text; it was prepared "
        f"from {corpus}: pass the corpus itself to --input, or train on the dataset as it is with data.dir={data}"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=re.escape(expected)):
            list(iter_documents([data]))
    argv = ["--input", str(data), "--tokenizer", str(tokenizer.path), "--output", str(tmp_path / "again")]
    assert prepare_cli.main([*argv, "--no-progress"]) == 2
    assert expected in capsys.readouterr().err and not (tmp_path / "again").exists()


def test_prepare_data_warns_once_of_a_skipped_file(tmp_path, tokenizer):
    """prepare_data resolves --input in several passes (output checks, the first-document probe, the
    tokenizing pass): the skipped-file warning was attributed to each caller and printed twice. It
    printed as Python formats a warning, the module's path and line first and the line of code after."""
    import shutil
    import subprocess
    import sys

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.jsonl").write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(40)))
    shutil.copyfile(tokenizer.path, tmp_path / "corpus" / "tokenizer.model")
    argv = ["--input", "corpus", "--tokenizer", str(tokenizer.path), "--output", "ds", "--seq-len", "16"]
    argv += ["--val-fraction", "0.2", "--no-progress", "--workers", "1"]
    tool = Path(__file__).resolve().parents[2] / "tools" / "prepare_data.py"
    done = subprocess.run([sys.executable, str(tool), *argv], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("skipped 1 file(s) that are not text") == 1, done.stderr
    # printed as a message, not as Python's "<path>:<line>: UserWarning: ..." and the line of code after it
    said = [line for line in done.stderr.splitlines() if "not text" in line]
    assert said == [
        "warning: --input corpus: skipped 1 file(s) that are not text (tokenizer.model; a tokenizer.model beside the corpus, say)"
    ]
    assert "UserWarning" not in done.stderr and "input_files.py" not in done.stderr


def test_a_compressed_binary_file_in_a_folder_is_skipped_like_an_uncompressed_one(tmp_path):
    """Only uncompressed files were checked for binary content: /usr/share/doc's 7 compressed PDFs and
    DVIs (valgrind/valgrind_manual.pdf.gz, 1.4 MB) were each read as a document of binary. The check
    now reads the first 8 KiB decompressed; compressed text is read as before, and a damaged
    compressed file is still refused by name, not skipped."""
    import bz2
    import lzma

    corpus = tmp_path / "doc"
    corpus.mkdir()
    pdf = b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Length 42 >>\nstream\n\x00\x01\x02\x9c\x00endstream\n"
    for name, pack in (
        ("manual.pdf.gz", gzip.compress),
        ("refcard.dvi.bz2", bz2.compress),
        ("fig.png.xz", lzma.compress),
    ):
        (corpus / name).write_bytes(pack(pdf))
    text = "A changelog, compressed as Debian ships them.\n"
    (corpus / "changelog.gz").write_bytes(gzip.compress(text.encode()))
    (corpus / "README").write_text("plain text\n")
    with pytest.warns(UserWarning, match=r"skipped 3 file\(s\) that are not text \(fig.png.xz, manual.pdf.gz, refcard"):
        assert list(iter_documents([corpus])) == ["plain text\n", text]
    with pytest.raises(DataError, match=r"manual.pdf.gz is not text \(a NUL byte in its first 8 KiB, decompressed"):
        list(iter_documents([corpus / "manual.pdf.gz"]))  # named itself: refused
    (corpus / "cut.gz").write_bytes(gzip.compress(text.encode() * 100)[:40])
    with pytest.raises(DataError, match=r"cut.gz is not a complete gzip file"):
        list(iter_documents([corpus]))


def test_a_glob_input_skips_binary_files_with_a_warning(tmp_path, tokenizer):
    """--input 'corpus/*' (quoted, as for a corpus of many files) read the recipe's
    corpus/tokenizer.model as a text document (94 documents of the 93-document recipe corpus,
    one of them the model's protobuf bytes); the folder itself skipped it with a warning."""
    import shutil

    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one document\n")
    (tmp_path / "corpus" / "b.jsonl").write_text('{"text": "two"}\n')
    shutil.copyfile(tokenizer.path, tmp_path / "corpus" / "tokenizer.model")
    with pytest.warns(UserWarning, match=r"corpus/\*: skipped 1 file\(s\) that are not text \(.*tokenizer.model"):
        assert list(iter_documents([str(tmp_path / "corpus" / "*")])) == ["one document\n", "two"]


def test_bad_jsonl_names_file_line_and_field(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: no field 'text' \(found \['body'\]\); pass --text-field"):
        list(iter_documents([tmp_path / "x.jsonl"]))
    (tmp_path / "y.jsonl").write_text('{"text": "ok"}\n{broken\n')
    with pytest.raises(DataError, match=r"y.jsonl:2: invalid JSON"):
        list(iter_documents([tmp_path / "y.jsonl"]))


def test_a_json_document_that_is_not_json_lines_is_named_with_the_conversion(tmp_path):
    """A .json file holding one JSON array (as pandas' to_json and many exports write it), pretty-printed
    or on one line, or records written over several lines, was refused as 'invalid JSON (Expecting
    value)' at line 1, or 'no field 'text' (found list)': true, but no hint that the reader takes one
    record per line. The error says what the file is and how to convert it; a broken line later in a
    JSON Lines file keeps its own message."""
    records = [{"text": "one"}, {"text": "two"}]
    (tmp_path / "pretty.json").write_text(json.dumps(records, indent=2))
    (tmp_path / "flat.json").write_text(json.dumps(records))
    (tmp_path / "objects.json").write_text("\n".join(json.dumps(r, indent=2) for r in records))
    for name, what in (("pretty", "a JSON array"), ("flat", "a JSON array"), ("objects", "a JSON object written over")):
        with pytest.raises(DataError, match=rf"{name}.json:1: the file is {what}.*not JSON Lines.*jq -c"):
            list(iter_documents([tmp_path / f"{name}.json"]))
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + "[broken\n")
    with pytest.raises(DataError, match=r"lines.jsonl:3: invalid JSON"):
        list(iter_documents([tmp_path / "lines.jsonl"]))


def test_missing_path_and_empty_corpus_fail_before_work(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(prepare_mod, "train_tokenizer", no_work)
    monkeypatch.setattr(prepare_mod, "write_dataset", no_work)
    with pytest.raises(DataError, match="input path .*nope.txt does not exist"):
        prepare_corpus([tmp_path / "nope.txt"], tmp_path / "out", 16)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DataError, match="holds no non-empty document"):
        prepare_corpus([tmp_path / "empty.txt"], tmp_path / "out", 16)
    assert not (tmp_path / "out").exists()
    assert prepare_cli.main(["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "o")]) == 2


def test_a_record_file_of_another_shape_is_refused_before_tokenizing(tmp_path, monkeypatch, capsys):
    """/usr/share/doc as a corpus read its text files, then, some 70 s of tokenizing in, met
    nodejs/abi_version_registry.json.gz, one JSON object over many lines, and stopped. Every JSON
    Lines file's first record is read before the work starts; the message is the reader's own."""

    def no_work(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(prepare_mod, "train_tokenizer", no_work)
    monkeypatch.setattr(prepare_mod, "write_dataset", no_work)
    corpus = tmp_path / "doc"
    (corpus / "a").mkdir(parents=True)
    (corpus / "a" / "README").write_text("plain text, read first\n")
    with gzip.open(corpus / "z_registry.json.gz", "wt") as fh:
        fh.write(json.dumps({"NODE_MODULE_VERSION": [{"modules": 108}]}, indent=2))
    with pytest.raises(DataError, match=r"z_registry.json.gz:1: the file is a JSON object written over"):
        prepare_corpus([corpus], tmp_path / "out", 16)
    monkeypatch.setattr(tokenizer_cli, "train_tokenizer", no_work)
    assert tokenizer_cli.main(["--input", str(corpus), "--output", str(tmp_path / "t.model")]) == 2
    assert "z_registry.json.gz:1: the file is a JSON object" in capsys.readouterr().err
    (corpus / "z_registry.json.gz").unlink()
    (corpus / "m.jsonl").write_text('{"body": "the text under another name"}\n')
    with pytest.raises(DataError, match=r"m.jsonl:1: no field 'text' \(found \['body'\]\)"):
        prepare_corpus([corpus], tmp_path / "out", 16)
    assert not (tmp_path / "out").exists()


def test_prepare_is_deterministic_and_parallel_equals_serial(tmp_path, documents, tokenizer):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": d}) + "\n" for d in documents))
    kwargs = dict(
        tokenizer_path=tokenizer.path, text_field="body", sequences_per_shard=16, show_progress=False, val_fraction=0.1
    )  # 82 documents: the default 0.01 would leave val empty (refused)
    prepare_corpus([corpus], tmp_path / "a", 32, workers=1, **kwargs)
    prepare_corpus([corpus], tmp_path / "b", 32, workers=2, **kwargs)
    a, b = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b")
    assert len([k for k in a if k.endswith(".tar")]) >= 2
    assert a == b  # byte-identical shards, manifest and tokenizer
    # the CLI, training its own tokenizer twice, is deterministic too (and shows the summary)
    argv = [
        "--input",
        str(corpus),
        "--text-field",
        "body",
        "--seq-len",
        "32",
        "--vocab-size",
        "400",
        "--sequences-per-shard",
        "16",
        "--workers",
        "1",
        "--no-progress",
        "--val-fraction",
        "0.1",
    ]
    assert prepare_cli.main(argv + ["--output", str(tmp_path / "c")]) == 0
    assert prepare_cli.main(argv + ["--output", str(tmp_path / "d")]) == 0
    assert shard_bytes(tmp_path / "c") == shard_bytes(tmp_path / "d")
    assert prepare_cli.main(argv + ["--output", str(tmp_path / "d")]) == 2  # not empty, no --overwrite


def test_parallel_tokenizing_reads_a_bounded_number_of_documents_ahead(documents, tokenizer):
    read = 0

    def corpus():
        nonlocal read
        for doc in documents * 5:
            read += 1
            yield doc

    tokens = prepare_mod.tokenize_documents(corpus(), tokenizer, workers=2, chunk_docs=3)
    first = next(tokens)
    assert read <= 2 * 2 * 3  # 2 x workers chunks of 3 in flight, not the corpus (400 documents)
    assert [ids.tolist() for ids in [first, *tokens]] == tokenizer.encode_batch(documents * 5)  # in order, none lost
    assert read == len(documents) * 5


@pytest.mark.parametrize("workers", [1, 2])
def test_an_empty_document_is_tokenized_to_no_ids(tokenizer, workers):
    """tokenize_documents gave an empty document no ids (write_dataset counts those as empty) until
    the bar's shares (cab28d3) divided by its length: ZeroDivisionError. The reference: sentencepiece's
    ids for each document."""
    docs = ["hello", "", "world"]
    encoded = prepare_mod.tokenize_documents(iter(docs), tokenizer, workers=workers)
    assert [ids.tolist() for ids in encoded] == tokenizer.encode_batch(docs)


@pytest.mark.parametrize("workers", [1, 2])
def test_tokenizing_goes_by_characters_so_the_bar_moves_every_chunk(tokenizer, workers):
    """Documents went to the tokenizer 256 at a time, and the bar of input read moves as each is packed, so
    it stood still while a chunk was encoded: 300 documents of 100 KB (Python sources and /usr/share/doc
    text as JSONL), 13.2 to 18.6 s without a move out of ~22 s (one process), 24 s with two. A chunk now
    closes at CHUNK_CHARS characters too (0.8 to 2.1 s; prepare_corpus's CPU time 8.1 -> 7.1 s). The
    reference: how many documents were read when the first one came back, and the documents' ids."""
    docs = [f"document {i}: " + "words of text\n" * 400 for i in range(60)]  # 5,613 to 5,614 characters each
    read = 0

    def corpus():
        nonlocal read
        for doc in docs:
            read += 1
            yield doc

    tokens = prepare_mod.tokenize_documents(corpus(), tokenizer, workers=workers, chunk_chars=12_000)
    first = next(tokens)
    assert read <= 3 * max(1, 2 * workers)  # chunks of 3 documents (12,000 characters reached), not of 60
    assert [ids.tolist() for ids in [first, *tokens]] == tokenizer.encode_batch(docs)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_bar_moves_within_a_long_document(tmp_path, tokenizer, monkeypatch, workers):
    """The bar of input read moved once a document was packed: a 60 MiB document held it still for its
    whole tokenizing (~50 s). It now moves as each piece of a long document is encoded, by that piece's
    share of the document's characters, up to the file's size (the reference: the bytes of the input)."""
    corpus = tmp_path / "book.txt"
    corpus.write_text("".join(f"line {i} of one long document\n" for i in range(2000)))  # ~62,000 characters
    monkeypatch.setattr(tokenizer_mod, "PIECE_CHARS", 5000)
    bars = recorded_bars(monkeypatch)
    prepare_mod.prepare_corpus(
        [corpus], tmp_path / "ds", SEQ_LEN, tokenizer_path=tokenizer.path, val_fraction=0, workers=workers
    )
    moves = sorted(set(bars["read"]))
    total = corpus.stat().st_size
    assert bars["read"] == sorted(bars["read"]) and moves[-1] == total
    assert len([m for m in moves if 0 < m < total]) >= 10  # 12 pieces of ~5,000 characters: a move each


@pytest.fixture(scope="module")
def english_tokenizer(tmp_path_factory) -> Tokenizer:
    """A BPE tokenizer (whitespace kept, as train_tokenizer makes them) of the Python documentation."""
    return train_tokenizer(
        (d["text"] for d in python_docs()), tmp_path_factory.mktemp("tok") / "en.model", vocab_size=2000
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_a_long_document_is_encoded_in_pieces_to_the_ids_of_the_whole(english_tokenizer, monkeypatch, workers):
    """sentencepiece took ~40 bytes a character to encode a document (a 60 MiB one: 3.1 GB resident, per
    tokenizing process). A document over PIECE_CHARS is now encoded in pieces cut before a newline; the
    reference is sentencepiece's encoding of the whole document. The cuts fall here (PIECE_CHARS lowered to
    500) beside runs of newlines, a document's first newline, a line longer than a piece, indented code and
    characters written as bytes; sentencepiece never sees more than a piece plus a line."""
    text = "".join(d["text"] for d in python_docs())[:120_000]
    lines = text.split("\n")
    lines[40] = "x" * 1300  # a line longer than a piece: the piece grows to its end
    lines[80] = "emoji \U0001f600\U0001f680 written as bytes"
    documents = ["\n\n" + "\n".join(lines) + "\n\n\n", "short", "one line, no newline " * 60]
    monkeypatch.setattr(tokenizer_mod, "PIECE_CHARS", 500)
    assert len(english_tokenizer.cut_document(documents[0])) > 150  # cut, at each newline after 500 characters
    assert english_tokenizer.cut_document(documents[2]) == [documents[2]]  # no newline to cut at

    longest = 0
    sentencepiece = english_tokenizer._sp

    class Recording:  # sentencepiece, noting the longest text it is given
        def __getattr__(self, name):
            return getattr(sentencepiece, name)

        def encode_as_numpy(self, texts):
            nonlocal longest
            longest = max(longest, *map(len, texts))
            return sentencepiece.encode_as_numpy(texts)

    if workers == 1:  # the processes load the tokenizer themselves
        monkeypatch.setattr(english_tokenizer, "_sp", Recording())
    encoded = list(prepare_mod.tokenize_documents(documents, english_tokenizer, workers=workers, chunk_chars=2000))
    assert [ids.tolist() for ids in encoded] == english_tokenizer.encode_batch(documents)
    if workers == 1:
        assert 0 < longest <= 1300 + 500 + 1


def test_a_document_is_encoded_whole_where_a_cut_may_change_its_ids(tmp_path, monkeypatch):
    """Cuts are made for BPE tokenizers that keep newlines as pieces (Tokenizer.cuts_at_newlines). The
    embedded fact world's tokenizer turns a newline and the spaces beside it into one space; a unigram
    tokenizer's choice between equal-scoring segmentations follows the float rounding of the text before
    (sentencepiece's running path score); a BPE tokenizer given with --tokenizer that keeps newlines but
    has sentencepiece's default remove_extra_whitespaces drops the spaces at a piece's end and merges
    those beside a newline into one (it was cut: "mat  " + "\n  and" encoded as "mat" + "\n and"): a
    document is encoded whole by each."""
    import io

    import sentencepiece as spm

    lines = ["the cat sat", "    on the mat  ", "", "and the dog ran"] * 50
    collapsing = train_tokenizer(lines, tmp_path / "c.model", vocab_size=300, keep_whitespace=False)
    unigram = train_tokenizer(lines, tmp_path / "u.model", vocab_size=300, model_type="unigram")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=300, model_type="bpe", byte_fallback=True,
        hard_vocab_limit=False, normalization_rule_name="identity", user_defined_symbols=["\n"], minloglevel=2,
    )  # fmt: skip
    (tmp_path / "r.model").write_bytes(model.getvalue())
    removing = Tokenizer(tmp_path / "r.model")
    monkeypatch.setattr(tokenizer_mod, "PIECE_CHARS", 10)
    text = "\n".join(lines)
    for tok in (collapsing, unigram, removing):
        assert not tok.cuts_at_newlines and tok.cut_document(text) == [text]
        assert next(prepare_mod.tokenize_documents([text], tok)).tolist() == tok.encode(text)


def test_document_longer_than_a_shard_is_split_not_dropped(tmp_path, tokenizer):
    long_doc = " ".join(f"word{i % 37}" for i in range(400))
    docs = ["A short one.", long_doc, "Another short one."]
    ids = [tokenizer.encode(d) for d in docs]
    assert len(ids[1]) > 3 * 9  # longer than a shard of 3 sequences of 9 tokens
    manifest = write_dataset(
        ids,
        tmp_path / "ds",
        tokenizer,
        8,
        val_fraction=0.0,
        sequences_per_shard=3,
        rows_per_block=2,
        show_progress=False,
    )
    train = manifest["splits"]["train"]
    assert train["tokens"] == sum(len(x) + 1 for x in ids) and train["documents"] == 3
    rows, metas = [], []
    for shard in train["shards"]:
        for t, m in read_blocks(tmp_path / "ds" / shard["path"], 9, manifest["token_dtype"], shard["sequences"]):
            rows.append(t)
            metas.append(m)
    rows, metas = np.concatenate(rows), np.concatenate(metas)
    stream = np.concatenate([r[:v] for r, v in zip(rows, metas[:, 1])])
    want = np.concatenate([np.array(x + [tokenizer.eos_id]) for x in ids])
    assert np.array_equal(stream, want)
    assert manifest["stats"]["empty_documents"] == 0
    assert len(train["shards"]) == -(-len(rows) // 3)
    assert (metas[:-1, 1] == 9).all() and metas[-1, 1] == len(want) - 9 * (len(rows) - 1)


def test_empty_after_tokenizing_is_skipped_and_counted(tmp_path, tokenizer):
    manifest = write_dataset(
        [[], tokenizer.encode("hello"), []], tmp_path / "ds", tokenizer, 8, val_fraction=0.0, show_progress=False
    )
    assert manifest["stats"]["empty_documents"] == 2 and manifest["documents"] == 1
    with pytest.raises(DataError, match="no non-empty document"):
        write_dataset([[]], tmp_path / "ds2", tokenizer, 8, show_progress=False)
    assert not (tmp_path / "ds2").exists()


def small_cfg(tmp_path, **syn):
    return DataConfig(
        cache_dir=str(tmp_path / "cache"),
        vocab_size=512,
        min_shards=4,
        synthetic=SyntheticConfig(**{"num_entities": 60, **syn}),
    )


def test_embedded_dataset_is_cached_and_probes_load(tmp_path):
    cfg = small_cfg(tmp_path)
    path = prepare_embedded_dataset(cfg, 64, show_progress=False)
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert prepare_embedded_dataset(cfg, 64, show_progress=False) == path
    assert (path / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rebuilt
    other = prepare_embedded_dataset(small_cfg(tmp_path, seed=9), 64, show_progress=False)
    assert other != path
    manifest = read_manifest(path)
    assert manifest["vocab_size"] <= 512 and manifest["token_dtype"] == "uint16"
    assert all(len(manifest["splits"][s]["shards"]) >= 4 for s in ("train", "val"))
    probes = load_probes(path)
    assert len(probes) == 60 * 5 and sum(p.is_new_fact for p in probes) == 6 * 5
    tok = Tokenizer(path / "tokenizer.model")
    batch = next(iter(ShardLoader(path, "train", batch_size=4, seq_len=64, rank=1, world_size=2, num_workers=2)))
    assert batch.tokens.shape == (4, 64) and int(batch.tokens.max()) < tok.vocab_size
    cfg.dir = str(path)
    assert prepare_embedded_dataset(cfg, 64) == path
    with pytest.raises(DataError, match="seq_len=64, but data.seq_len=32"):
        prepare_embedded_dataset(cfg, 32)


KILLED_EMBEDDED_BUILD = """
import os, signal, sys
from pretrain import progress_bars
from pretrain.config import DataConfig, SyntheticConfig
from pretrain.data import embedded
def killed(*args, **kwargs):  # the tokenizer is trained into the scratch folder by now
    os.kill(os.getpid(), signal.SIGKILL)
embedded.write_dataset = killed
cfg = DataConfig(cache_dir=sys.argv[1], vocab_size=512, min_shards=4, synthetic=SyntheticConfig(num_entities=60))
embedded.prepare_embedded_dataset(cfg, 64, show_progress=False)
"""


def test_a_killed_embedded_build_leaves_scratch_that_the_next_build_removes(tmp_path, repo_root):
    """A build killed by SIGKILL left its tokenizer scratch as `embedded-<random>`, beside the
    `embedded-<key>` datasets and never removed (2026-12-07); the next build now removes it."""
    cfg = small_cfg(tmp_path)
    killed = subprocess.run([sys.executable, "-c", KILLED_EMBEDDED_BUILD, cfg.cache_dir], cwd=repo_root, timeout=300)
    assert killed.returncode == -signal.SIGKILL
    cache = Path(cfg.cache_dir)
    left = [p for p in cache.iterdir() if p.is_dir()]
    assert len(left) == 1 and (left[0] / "tokenizer.model").is_file(), left
    with pytest.warns(UserWarning, match=f"removed 1 temporary .* {re.escape(left[0].name)}"):
        path = prepare_embedded_dataset(cfg, 64, show_progress=False)
    assert [p for p in cache.iterdir() if p.is_dir()] == [path]
    assert read_manifest(path)["creation"]["kind"] == "embedded-fact-world"


@pytest.mark.parametrize("num_entities", [4, 10])
def test_embedded_splits_have_min_shards_when_they_have_the_rows(tmp_path, num_entities):
    """At min_shards=8, ceil(rows / min_shards) rows per shard cut the 18 train rows of 4 entities
    into 6 shards and the 13 val rows of 10 entities into 7."""
    cfg = small_cfg(tmp_path, num_entities=num_entities)
    cfg.min_shards, cfg.val_fraction = 8, 0.25
    manifest = read_manifest(prepare_embedded_dataset(cfg, 64, show_progress=False))
    for split in ("train", "val"):
        rows = [s["sequences"] for s in manifest["splits"][split]["shards"]]
        assert len(rows) >= min(8, sum(rows)), (split, rows)


def stored_documents(path, split="train") -> list[list[int]]:
    """A split's documents (token ids, EOS removed), read back from its shards in write order."""
    manifest = read_manifest(path)
    width = manifest["seq_len"] + 1
    pieces = []
    for shard in manifest["splits"][split]["shards"]:
        for t, m in read_blocks(path / shard["path"], width, manifest["token_dtype"], shard["sequences"]):
            pieces.extend(row[:v] for row, v in zip(t, m[:, 1]))
    stream = np.concatenate(pieces).tolist()
    docs, cur = [], []
    for t in stream:
        if t == manifest["eos_id"]:
            docs.append(cur)
            cur = []
        else:
            cur.append(t)
    assert not cur
    return docs


def contains(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_embedded_corpus_teaches_the_probes_answers(tmp_path):
    """Seen facts appear in the training tokens as question-then-answer; new facts never appear."""
    cfg = small_cfg(tmp_path, num_entities=40)
    path = prepare_embedded_dataset(cfg, 64, show_progress=False)
    tok = Tokenizer(path / "tokenizer.model")
    world = build_fact_world(40, seed=cfg.synthetic.seed)
    docs = stored_documents(path, "train") + stored_documents(path, "val")
    assert len(docs) == len(world.train_documents)
    corpus_text = "\n".join(tok.decode(d) for d in docs)
    probes = load_probes(path)
    assert probes == world.probes
    for ent in world.entities:
        assert (ent.name in corpus_text) != ent.is_new_fact
    for p in probes:
        q, a = tok.encode(p.question), tok.encode(p.answer)
        assert tok.encode(p.question + " " + p.answer) == q + a  # the greedy answer is encode(answer)
        if not p.is_new_fact:
            assert any(contains(d, q + a) for d in docs), p


def test_fact_world_is_deterministic_and_consistent():
    a, b = build_fact_world(200, seed=5), build_fact_world(200, seed=5)
    assert a == b and build_fact_world(200, seed=6) != a
    assert len({e.name for e in a.entities}) == 200
    for attr in ATTRIBUTES:
        distinct = len({getattr(e, attr) for e in a.entities})
        assert {p.chance for p in a.probes if p.attribute == attr} == {1.0 / distinct}
    train_names = {e.name for e in a.entities if not e.is_new_fact}
    assert all(e.mentor != e.name and e.mentor in train_names for e in a.entities)
    assert sum(e.is_new_fact for e in a.entities) == 20
    assert len(a.train_documents) == 180 * 6 and len(a.new_fact_documents) == 20 * 6


def test_bad_synthetic_config(tmp_path):
    with pytest.raises(DataError, match="num_entities=1 must be >= 2"):
        prepare_embedded_dataset(small_cfg(tmp_path, num_entities=1), 64)
    with pytest.raises(DataError, match="new_fact_fraction=1.0"):
        prepare_embedded_dataset(small_cfg(tmp_path, new_fact_fraction=1.0), 64)
    assert not list((tmp_path / "cache").glob("embedded-*"))


def test_slices_then_merge_equal_a_single_process_preparation(tmp_path, documents, tokenizer):
    """5 input files prepared as 3 slices + merge == one prepare_corpus run: same shards, same manifest."""
    import json as _json

    from pretrain.data import prepare_corpus, read_manifest
    from pretrain.data.slices import merge_slices, prepare_slice

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for k in range(5):  # uneven files, one .gz, one plain text
        part = documents[k * 17 : (k + 1) * 17]
        if k == 2:
            (corpus / f"part{k}.txt").write_text(part[0])
        elif k == 4:
            with gzip.open(corpus / f"part{k}.jsonl.gz", "wt") as fh:
                fh.writelines(_json.dumps({"text": d}) + "\n" for d in part)
        else:
            (corpus / f"part{k}.jsonl").write_text("".join(_json.dumps({"text": d}) + "\n" for d in part))
    inputs = [str(corpus / "part*")]  # a glob
    opts = dict(val_fraction=0.2, seed=7, sequences_per_shard=8)
    single = prepare_corpus(inputs, tmp_path / "single", 32, tokenizer_path=tokenizer.path, show_progress=False, **opts)
    for i in range(3):
        prepare_slice(inputs, tmp_path / "merged", tokenizer.path, i, 3)
    merged = merge_slices(tmp_path / "merged", tokenizer.path, 32, show_progress=False, **opts)
    assert merged == single == read_manifest(tmp_path / "merged")
    expected_docs = 17 * 3 + 1 + len(documents[68:85])  # the .txt file is one document
    assert single["documents"] == expected_docs and single["stats"]["documents"] == expected_docs
    for split in ("train", "val"):
        for shard in single["splits"][split]["shards"]:
            a = (tmp_path / "single" / shard["path"]).read_bytes()
            assert a == (tmp_path / "merged" / shard["path"]).read_bytes(), shard["path"]


@pytest.mark.filterwarnings("ignore:--val-fraction=0")
def test_merge_refuses_missing_or_mismatched_slices(tmp_path, documents, tokenizer):
    from pretrain.data.slices import merge_slices, parse_slice, prepare_slice

    src = tmp_path / "a.txt"
    src.write_text("\n\n".join(documents[:10]))
    prepare_slice([src], tmp_path / "out", tokenizer.path, 0, 2)
    with pytest.raises(DataError, match=r"lacks slice\(s\) \[1\] of 2: run tools/prepare_data.py --slice 1/2"):
        merge_slices(tmp_path / "out", tokenizer.path, 32)
    sliced = prepare_slice([src], tmp_path / "out", tokenizer.path, 1, 2)  # slice 0 of 2 holds no file
    merged = merge_slices(tmp_path / "out", tokenizer.path, 32, val_fraction=0.0, show_progress=False)
    assert merged["documents"] == 1  # a .txt file is one document
    assert merged["splits"]["train"]["tokens"] == len(tokenizer.encode(src.read_text())) + 1  # + EOS
    tokens = (sliced / "tokens.bin").read_bytes()
    (sliced / "tokens.bin").write_bytes(tokens[:-1])
    with pytest.raises(DataError, match=rf"tokens.bin \({len(tokens) - 1} bytes\) does not match lengths.npy"):
        merge_slices(tmp_path / "out", tokenizer.path, 32, val_fraction=0.0, show_progress=False, overwrite=True)
    with pytest.raises(DataError, match="must be i/N"):
        parse_slice("2/2")
    with pytest.raises(DataError, match="--slice needs --tokenizer"):
        prepare_slice([src], tmp_path / "out", None, 1, 2)


def test_tokenizer_sample_is_bounded_uniform_and_whole_when_small():
    from pretrain.data.tokenizer import sample_sentences

    lines = [f"line {k}" for k in range(10_000)]
    assert sample_sentences(["\n".join(lines[:50])], 100) == lines[:50]  # small corpus: all, in order
    sample = sample_sentences(("\n".join(lines[k : k + 100]) for k in range(0, 10_000, 100)), 1000, seed=1)
    assert len(sample) == 1000 and len(set(sample)) == 1000 and set(sample) <= set(lines)
    assert sample == sample_sentences(["\n".join(lines)], 1000, seed=1)  # reproducible
    late = sum(int(s.split()[1]) >= 5000 for s in sample)  # uniform over the stream, not its start
    assert abs(late - 500) <= 4 * (1000 * 0.25) ** 0.5


def test_a_trained_tokenizer_keeps_the_text_as_written(tmp_path):
    """train_tokenizer left sentencepiece's default normalization on, which turns every run of
    whitespace, newlines included, into one space: no document of the own-text recipe's corpus decoded to its
    text (0 of 93), code lost its lines and indentation, and a model could never write a newline.
    The reference is the text itself: decode(encode(text)) == text, on the bundled English corpus
    (prose, Python examples, license layout) and on text with tabs, blank lines and odd characters."""
    from pretrain.data.bundled_text import bundled_documents
    from pretrain.data.tokenizer import NEWLINE, train_tokenizer

    docs = [d["text"] for d in bundled_documents(["python-docs"])][:30]
    tok = train_tokenizer(docs, tmp_path / "t.model", 2000)
    odd = ["def f(x):\n\tif x:\n        return  1\n\n\n", "  leading and trailing  \n", "ﬁne ＡＢＣ café\r\n✓ 𝄞 \u200b"]
    for text in docs + odd:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a\nb").count(tok._sp.piece_to_id(NEWLINE)) == 1 and not tok._sp.IsByte(4)
    assert tok._sp.id_to_piece(4) == NEWLINE  # after the 4 specials, before the learned pieces
    # keep_whitespace=False: sentencepiece's normalization, which the embedded fact world is built with
    legacy = train_tokenizer(docs, tmp_path / "legacy.model", 2000, keep_whitespace=False)
    assert legacy.decode(legacy.encode(odd[0])) == "def f(x): if x: return 1"


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_the_trainer_streamed_its_sample_trains_the_model_of_the_whole_list(tmp_path, monkeypatch, model_type):
    """The trainer child (pretrain/data/sentencepiece_worker.py) read its whole sample from the pipe, decoded
    it and split it into a list before training: held three times beside sentencepiece's own copy (peak
    776 MiB on a 50 MB corpus of Python sources and /usr/share/doc text, all 1.45M lines; 648 MiB streamed).
    It now hands sentencepiece the lines as it reads them. The reference is sentencepiece trained in this
    process on the list of sentences, with the same options: the model bytes must be the same, on lines
    with indentation, tabs and characters of 2, 3 and 4 bytes of UTF-8."""
    import hashlib
    import io

    import sentencepiece as spm

    from pretrain.data.bundled_text import bundled_documents

    seen = []
    trained_model = tokenizer_mod._trained_model
    monkeypatch.setattr(
        tokenizer_mod,
        "_trained_model",
        lambda sentences, options: seen.append((sentences, options)) or trained_model(sentences, options),
    )
    docs = [d["text"] for d in bundled_documents(["python-docs"])][:10]
    docs.append("def f(x):\n\tif x:\n        return  1\n  café ﬁne ＡＢＣ ✓ 𝄞 \u200b ünïcödé\n" * 20)
    tok = train_tokenizer(docs, tmp_path / "t.model", 1200, model_type=model_type)
    ((sentences, options),) = seen
    whole = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(list(sentences)), model_writer=whole, **options)
    assert tok.sha256 == hashlib.sha256(whole.getvalue()).hexdigest()


def test_a_tokenizer_smaller_than_asked_is_named(tmp_path):
    """--vocab-size is an upper bound (hard_vocab_limit=False): on the recipe's 702K-character corpus
    --vocab-size 32000 gave 22,786 pieces (unigram: 6,209), printed as 'vocab 22786' with no word that it
    fell short. The warning names both sizes and the fix; a size the sample reaches warns of nothing."""
    import warnings

    from pretrain.data.bundled_text import bundled_documents

    texts = [d["text"] for d in bundled_documents(["licenses"])][:4]
    fewer = r"has (\d+) pieces, fewer than the 20000 asked: bpe found no more .* train on more text"
    with pytest.warns(UserWarning, match=fewer):
        tok = train_tokenizer(texts, tmp_path / "big.model", 20000)
    assert tok.vocab_size < 20000
    with pytest.warns(UserWarning, match=r"raise --max-sentences \(the sample was capped at 50 lines\)"):
        train_tokenizer(texts, tmp_path / "capped.model", 20000, max_sentences=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train_tokenizer(texts, tmp_path / "small.model", 600).vocab_size == 600


def test_sample_corpus_writes_each_part_once(tmp_path, capsys):
    """--part licenses licenses wrote the 14 license texts twice (28 documents): a corpus with every
    document duplicated, half of them likely to land in the other split than their copy."""
    from tools.sample_corpus import main as sample_main

    assert sample_main(["--output", str(tmp_path / "once.jsonl"), "--part", "licenses"]) == 0
    assert sample_main(["--output", str(tmp_path / "twice.jsonl"), "--part", "licenses", "licenses"]) == 0
    once = (tmp_path / "once.jsonl").read_text()
    assert (tmp_path / "twice.jsonl").read_text() == once
    assert len({json.loads(line)["text"] for line in once.splitlines()}) == len(once.splitlines())


def test_a_folder_as_tokenizer_names_the_model_file_in_it(tmp_path, tokenizer):
    """--tokenizer data/english (the dataset, or an export folder, instead of its tokenizer.model) said
    'tokenizer model data/english does not exist: train one with tools/train_tokenizer.py'."""
    import shutil

    (tmp_path / "ds").mkdir()
    shutil.copyfile(tokenizer.path, tmp_path / "ds" / "tokenizer.model")
    with pytest.raises(DataError, match=rf"tokenizer model {tmp_path / 'ds'} is a folder: pass .*ds/tokenizer.model"):
        Tokenizer(tmp_path / "ds")
    with pytest.raises(DataError, match=r"is a folder: name the .model file itself"):
        Tokenizer(tmp_path)
    assert Tokenizer(tmp_path / "ds" / "tokenizer.model").sha256 == tokenizer.sha256


def test_vocab_size_beside_a_given_tokenizer_is_refused(tmp_path, documents, tokenizer, capsys):
    """--vocab-size sizes the tokenizer trained on the corpus; with --tokenizer (or --embedded, whose
    config sizes it) it was ignored in silence: a dataset of the given tokenizer's vocabulary came out.
    It is now refused before anything is read or written; without it the given tokenizer is used."""
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    argv = ["--input", str(corpus), "--seq-len", "32", "--val-fraction", "0.2", "--no-progress"]
    argv += ["--tokenizer", str(tokenizer.path)]
    refusals = [
        (argv + ["--output", str(tmp_path / "a"), "--vocab-size", "5000"], "--vocab-size 5000 sizes a tokenizer"),
        (["--embedded", "--vocab-size", "500"], "--vocab-size 500 and --embedded: the config sizes it"),
    ]
    for args, message in refusals:
        with pytest.raises(SystemExit) as exit_info:
            prepare_cli.main(args)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert prepare_cli.main(argv + ["--output", str(tmp_path / "b")]) == 0
    assert read_manifest(tmp_path / "b")["vocab_size"] == tokenizer.vocab_size


def test_options_the_chosen_mode_does_not_read_are_refused(tmp_path, monkeypatch, capsys):
    """`--embedded --output d` built the fact corpus into its cache folder and left d unmade, and
    config overrides given with a corpus (`--input c --output d data.seq_len=64`) were dropped: the
    dataset came out at --seq-len's default. Both are refused before anything is read or built; so is
    `--embedded --seq-len 64`, whose corpus came out at the config's data.seq_len."""
    monkeypatch.chdir(tmp_path)  # the embedded corpus's cache folder is relative: none may appear here
    corpus = tmp_path / "c.txt"
    corpus.write_text("one document\n")
    refusals = [
        (["--embedded", "--output", "d"], "--output with --embedded"),
        (["--embedded", "--input", str(corpus), "--tokenizer", "t.model"], "--input and --tokenizer with --embedded"),
        (["--embedded", "--merge"], "--merge with --embedded"),
        # the corpus options that shape a dataset were dropped too: the corpus came out at the config's seq_len
        (
            ["--embedded", "--seq-len", "64", "--val-fraction", "0.1"],
            "--seq-len 64 and --val-fraction 0.1 with --embedded: the embedded fact corpus is shaped by --config "
            "and its overrides, not by this tool's corpus options; drop them and pass data.seq_len=64 "
            "data.val_fraction=0.1 instead",
        ),
        (["--embedded", "--format", "jsonl", "--overwrite"], "--format jsonl and --overwrite with --embedded"),
        (["--input", str(corpus), "--output", "d", "data.seq_len=64"], "data.seq_len=64: the config and its overrides"),
        (["--input", str(corpus), "--output", "d", "--config", "configs/smf_tiny.yaml"], "--config configs/smf_tiny"),
    ]
    for args, message in refusals:
        with pytest.raises(SystemExit) as exit_info:
            prepare_cli.main([*args, "--no-progress"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt"]


def test_the_corpus_tools_start_without_torch(repo_root):
    """Importing pretrain.data imported its loaders, and reading a shard's module imported webdataset:
    torch with either (python -X importtime: torch ~1 s of it; `train_tokenizer.py --help` took 1.6 to
    3.0 s on the shared machine, now 0.24 s). The package's names now load with their modules, so the
    commands that need no torch (training a tokenizer, preparing, sampling a corpus) start without it;
    the reference is sys.modules in a fresh interpreter."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "import tools.train_tokenizer, tools.prepare_data, tools.sample_corpus, tools.inspect_data\n"
        "from pretrain.data import DataError, Tokenizer, iter_documents, prepare_corpus, read_manifest\n"
        "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))\n"
        "from pretrain.data import ShardLoader\n"
        "print('torch' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "True"]


def test_a_long_document_encoded_whole_is_named_with_its_memory(tmp_path, english_tokenizer, monkeypatch):
    """A unigram tokenizer encodes a document whole (no cut is provably the same ids: its tie-breaking follows
    a float32 path score rebased where it passes 1e5; cut at newlines, 45 of the 1.96M tokens of 6 MB of
    Python sources differed): prepare_data on a 60 MiB document peaked at 2.35 GB resident, against 0.5 GB with
    a BPE tokenizer, without a word. A document over WHOLE_DOCUMENT_WARNING_CHARS now warns with its size, the
    memory expected (27 bytes a byte of its UTF-8, measured: per character it grows with the bytes a character
    takes) and the fix; the ids stay sentencepiece's of the whole document, and a BPE tokenizer, which cuts,
    says nothing."""
    lines = ["the cat sat", "    on the mat  ", "", "and the dog ran"] * 50
    unigram = train_tokenizer(lines, tmp_path / "u.model", vocab_size=300, model_type="unigram")
    monkeypatch.setattr(tokenizer_mod, "PIECE_CHARS", 10)
    monkeypatch.setattr(tokenizer_mod, "WHOLE_DOCUMENT_WARNING_CHARS", 100_000)
    text = "\n".join(lines * 20)  # 36,780 characters: under the limit
    long_text = "\n".join(lines * 60) + "\nna\u00efve caf\u00e9s \u4e16\u754c" * 10  # 110,500 characters
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert next(prepare_mod.tokenize_documents([text], unigram)).tolist() == unigram.encode(text)
        assert len(english_tokenizer.cut_document(long_text)) > 1
    with pytest.warns(UserWarning) as caught:
        assert next(prepare_mod.tokenize_documents([long_text], unigram)).tolist() == unigram.encode(long_text)
    (message,) = [str(w.message) for w in caught]
    assert message.startswith(
        f"a document of {len(long_text):,} characters is encoded whole, as {unigram.path} is a unigram model"
    )
    utf8 = len(long_text) + 2 * 10 + 2 * 2 * 10  # the two-byte and the three-byte characters
    assert utf8 == len(long_text.encode())
    assert f"about {round(utf8 * 27 / 2**20):,} MiB (~27 bytes a byte of its {utf8:,} bytes of UTF-8)" in message
    assert "--model-type bpe" in message


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".xz"])
@pytest.mark.parametrize("stem", ["records", "my records"])  # the second: quoted for the shell
def test_the_conversion_named_for_a_json_document_runs_on_a_compressed_file(tmp_path, suffix, stem):
    """For /usr/share/doc/nodejs/abi_version_registry.json.gz the error named `jq -c . <file>.json.gz >
    abi_version_registry.jsonl`, and jq reads no compressed file: 'parse error: Invalid numeric literal at line
    2, column 0'. A compressed file's conversion now decompresses into jq. The reference: the command named,
    run where jq is installed, writes the JSON Lines the reader reads."""
    import bz2
    import lzma
    import shlex
    import shutil
    import subprocess

    records = [{"text": "one"}, {"text": "two"}]
    data = json.dumps(records, indent=2).encode()
    compress = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix]
    path = tmp_path / f"{stem}.json{suffix}"
    path.write_bytes(compress(data))
    with pytest.raises(DataError) as err:
        list(iter_documents([path]))
    command = re.search(r"convert it, e\.g\. (.*?); or, if", str(err.value)).group(1)
    tool = {"": None, ".gz": "gzip", ".bz2": "bzip2", ".xz": "xz"}[suffix]
    quoted, written = shlex.quote(str(path)), shlex.quote(f"{stem}.jsonl")
    assert command == (
        f"{tool} -dc {quoted} | jq -c '.[]' > {written}" if tool else f"jq -c '.[]' {quoted} > {written}"
    )
    if shutil.which("jq") is None or (tool and shutil.which(tool) is None):
        pytest.skip("jq or the decompressor is not installed: the command is not run")
    subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True)
    assert list(iter_documents([tmp_path / f"{stem}.jsonl"])) == ["one", "two"]


@pytest.mark.parametrize("given", [True, False], ids=["tokenizer-given", "tokenizer-trained"])
def test_a_tokenizer_scratch_folder_is_made_only_to_train_one(tmp_path, tokenizer, documents, monkeypatch, given):
    """prepare's `tokenizer-*` folder in the temporary directory is left behind by a killed run: it
    is made only where a tokenizer is trained, never beside a given one (it used to be made always)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    seen_while_writing = []
    write = prepare_mod.write_dataset

    def recording(*args, **kwargs):
        seen_while_writing.extend(p.name for p in scratch.iterdir())
        return write(*args, **kwargs)

    monkeypatch.setattr(prepare_mod, "write_dataset", recording)
    corpus = tmp_path / "c.jsonl"
    write_jsonl(corpus, [{"text": text} for text in documents[:200]])
    prepare_corpus(
        [corpus],
        tmp_path / "ds",
        32,
        tokenizer_path=tokenizer.path if given else None,
        vocab_size=400,
        val_fraction=0.0,
        show_progress=False,
    )
    assert [name.startswith("tokenizer-") for name in seen_while_writing] == ([] if given else [True])
    assert list(scratch.iterdir()) == []  # and a finished run leaves none


def test_the_tokenizer_tool_says_how_much_text_it_sampled_and_from_where(tmp_path, capsys):
    """train_tokenizer.py said only the model it wrote: a user with a 50 GB corpus could not tell that it
    trained on --max-sentences lines of it. The reference: the corpus's lines, bytes and documents counted
    here from the text written (blank lines are not lines of the sample; 'é' is 2 bytes)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "café", "epsilon"]
    documents = [[" ".join(words[(d + i + j) % 6] for j in range(5)) for i in range(3)] for d in range(300)]
    for name, part in (("a.txt", documents[:200]), ("b.txt", documents[200:])):
        (corpus / name).write_text("\n\n".join("\n".join(lines) for lines in part) + "\n")
    lines = [line for doc in documents for line in doc]
    text_bytes = sum(len(line.encode()) for line in lines)
    stored = sum(p.stat().st_size for p in corpus.iterdir())
    argv = ["--input", str(corpus), "--format", "blocks", "--output", str(tmp_path / "t.model"), "--vocab-size", "300"]

    assert tokenizer_cli.main([*argv, "--max-sentences", "7"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    sampled = re.fullmatch(
        rf"tokenizer sample: 7 of {len(lines)} non-blank lines \(a seeded uniform sample; (\d+) KiB of "
        rf"{round(text_bytes / 1024)} KiB of text\), from 300 documents in 2 files \({round(stored / 1024)} KiB as "
        rf"stored\) of --input {re.escape(str(corpus))}",
        first,
    )
    assert sampled, first
    assert tokenizer_cli.main(argv) == 0  # every line
    assert capsys.readouterr().out.startswith(f"tokenizer sample: {len(lines)} of {len(lines)} non-blank lines (all;")


def test_progress_in_a_log_comes_as_plain_lines(tmp_path, tokenizer):
    """With stderr a pipe (a Slurm log, `2> log`), prepare_data wrote tqdm's in-place redraws: carriage
    returns, a log of `\\r`-joined redraws on one line. It now writes plain lines (pretrain.progress_bars):
    a bounded few per bar, the last saying how far the work got."""
    corpus = tmp_path / "a.jsonl"
    corpus.write_text("".join(f'{{"text": "document {i} of the progress corpus"}}\n' for i in range(400)))
    argv = ["--input", str(corpus), "--tokenizer", str(tokenizer.path), "--output", "ds", "--seq-len", "16"]
    tool = Path(__file__).resolve().parents[2] / "tools" / "prepare_data.py"
    # bytes: text=True would read each carriage return as a line break
    done = subprocess.run(
        [sys.executable, str(tool), *argv, "--val-fraction", "0.1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        timeout=120,
    )
    log = done.stderr.decode()
    assert done.returncode == 0, log
    assert "\r" not in log and "\x1b" not in log, repr(log)
    read = [line for line in log.split("\n") if line.startswith("read:")]
    tokens = [line for line in log.split("\n") if line.startswith("prepare:")]
    # the start and the end of each bar in a run of seconds (one more per LOG_INTERVAL_S on a long one)
    assert 1 <= len(read) <= 3 and 1 <= len(tokens) <= 3, log
    size = progress_bars.tqdm.format_sizeof(corpus.stat().st_size)  # as tqdm writes a count: 3 digits and a unit
    assert "100%" in read[-1] and f"{size}/{size}" in read[-1], read[-1]
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    written = sum(split["tokens"] for split in manifest["splits"].values())
    assert tokens[-1].startswith(f"prepare: {progress_bars.tqdm.format_sizeof(written)}tok "), (tokens[-1], written)


def test_prepare_data_training_a_tokenizer_says_how_much_text_it_sampled(tmp_path, capsys):
    """prepare_data.py without --tokenizer trains one and said nothing of its sample, where
    train_tokenizer.py prints `tokenizer sample: ...`. It prints the same line (the same code,
    pretrain.data.tokenizer.sample_line); the reference counts the lines and bytes of the text written."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "café", "epsilon"]
    documents = [[" ".join(words[(d + i + j) % 6] for j in range(5)) for i in range(3)] for d in range(300)]
    (corpus / "a.txt").write_text("\n\n".join("\n".join(lines) for lines in documents) + "\n")
    lines = [line for doc in documents for line in doc]
    text_bytes = sum(len(line.encode()) for line in lines)
    stored = (corpus / "a.txt").stat().st_size
    argv = ["--input", str(corpus), "--format", "blocks", "--output", str(tmp_path / "ds"), "--vocab-size", "300"]
    assert prepare_cli.main([*argv, "--seq-len", "16", "--val-fraction", "0.1", "--no-progress"]) == 0
    said = capsys.readouterr().out.splitlines()
    assert said[0] == (
        f"tokenizer sample: {len(lines)} of {len(lines)} non-blank lines (all; {round(text_bytes / 1024)} KiB of "
        f"{round(text_bytes / 1024)} KiB of text), from 300 documents in 1 file ({round(stored / 1024)} KiB as "
        f"stored) of --input {corpus}"
    ), said
    assert tokenizer_cli.main([*argv[:4], "--output", str(tmp_path / "t.model"), "--vocab-size", "300"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == said[0]  # the tokenizer tool's line, word for word
