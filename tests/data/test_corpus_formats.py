"""The compressed and columnar inputs public corpora ship in (.jsonl.zst, .parquet), read
against the plain JSONL of the same documents: same documents, same shards, and a damaged
file is an error naming it, never a silently shorter corpus."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_helpers import write_jsonl
from pretrain.data import CorpusStats, DataError, iter_documents, prepare_corpus
from pretrain.data.bundled_text import bundled_documents
from pretrain.data.corpus import PARQUET_BATCH_ROWS


@pytest.fixture(scope="module")
def docs():
    """Real English: CPython's documentation topics (ships with every Python)."""
    texts = [d["text"] for d in bundled_documents(["python-docs"])]
    # more rows than one Parquet batch, so the batch boundary is crossed
    return (texts * (PARQUET_BATCH_ROWS // len(texts) + 2))[: PARQUET_BATCH_ROWS + 37]


def write_zst_frames(path, rows, frames=3):
    """A multi-frame .zst (as `zstd` writes for concatenated or large inputs)."""
    lines = [(json.dumps(r) + "\n").encode() for r in rows]
    step = -(-len(lines) // frames)
    path.write_bytes(
        b"".join(
            zstandard.ZstdCompressor(level=3).compress(b"".join(lines[i : i + step]))
            for i in range(0, len(lines), step)
        )
    )


def write_parquet(path, texts, row_group_size=300):
    table = pa.table({"id": list(range(len(texts))), "text": texts, "url": [f"doc{i}" for i in range(len(texts))]})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_zst_and_parquet_yield_the_jsonl_documents(tmp_path, docs):
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in docs])
    write_zst_frames(tmp_path / "a.jsonl.zst", [{"text": t} for t in docs])
    write_parquet(tmp_path / "a.parquet", docs)
    reference = list(iter_documents([tmp_path / "a.jsonl"]))
    assert reference == docs
    assert list(iter_documents([tmp_path / "a.jsonl.zst"])) == reference
    stats = CorpusStats()
    assert list(iter_documents([tmp_path / "a.parquet"], stats=stats)) == reference
    assert stats.documents == len(docs)


def test_parquet_nulls_and_empty_strings_are_counted_and_skipped(tmp_path):
    pq.write_table(pa.table({"content": ["one", None, "", "two"]}), tmp_path / "b.parquet")
    stats = CorpusStats()
    assert list(iter_documents([tmp_path / "b.parquet"], text_field="content", stats=stats)) == ["one", "two"]
    assert (stats.documents, stats.empty_documents) == (2, 2)


def test_dictionary_encoded_parquet_text_reads_as_the_plain_column(tmp_path, docs):
    """pandas categoricals and some exporters store a text column dictionary-encoded."""
    texts = docs[:50] * 3  # repeated, as dictionary encoding is used for
    pq.write_table(pa.table({"text": pa.array(texts).dictionary_encode()}), tmp_path / "dict.parquet")
    assert pq.ParquetFile(tmp_path / "dict.parquet").schema_arrow.field("text").type == pa.dictionary(
        pa.int32(), pa.string()
    )
    assert list(iter_documents([tmp_path / "dict.parquet"])) == texts


def test_compressed_parquet_is_refused_with_the_fix(tmp_path, docs):
    write_parquet(tmp_path / "f.parquet", docs[:5])
    (tmp_path / "f.parquet.gz").write_bytes(gzip.compress((tmp_path / "f.parquet").read_bytes()))
    with pytest.raises(DataError, match=r"f.parquet.gz is a compressed Parquet file.*decompress it first \(gunzip"):
        list(iter_documents([tmp_path / "f.parquet.gz"]))


def test_prepared_from_zst_or_parquet_the_shards_equal_the_jsonl_ones(tmp_path, docs):
    corpus = docs[:60]
    write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in corpus])
    write_zst_frames(tmp_path / "c.jsonl.zst", [{"text": t} for t in corpus])
    write_parquet(tmp_path / "c.parquet", corpus, row_group_size=7)
    kwargs = dict(vocab_size=512, val_fraction=0.1, sequences_per_shard=64, show_progress=False)
    prepare_corpus([tmp_path / "c.jsonl"], tmp_path / "from_jsonl", 64, **kwargs)
    tok = tmp_path / "from_jsonl" / "tokenizer.model"
    prepare_corpus([tmp_path / "c.jsonl"], tmp_path / "ref", 64, tokenizer_path=tok, **kwargs)
    prepare_corpus([tmp_path / "c.jsonl.zst"], tmp_path / "zst", 64, tokenizer_path=tok, **kwargs)
    prepare_corpus([tmp_path / "c.parquet"], tmp_path / "pq", 64, tokenizer_path=tok, **kwargs)

    def shards(root):
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.glob("*/*.tar"))}

    reference = shards(tmp_path / "ref")
    assert reference and shards(tmp_path / "zst") == reference and shards(tmp_path / "pq") == reference
    # the tokenizer trained on the Parquet input is the one trained on the JSONL
    prepare_corpus([tmp_path / "c.parquet"], tmp_path / "pq_tok", 64, **kwargs)
    assert (tmp_path / "pq_tok" / "tokenizer.model").read_bytes() == tok.read_bytes()


def test_truncated_or_corrupt_zst_is_an_error_naming_the_file(tmp_path, docs):
    write_zst_frames(tmp_path / "d.jsonl.zst", [{"text": t} for t in docs], frames=1)
    data = (tmp_path / "d.jsonl.zst").read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.zst is not a complete zstd file .*zstd -t"):
        list(iter_documents([tmp_path / "cut.jsonl.zst"]))
    (tmp_path / "junk.jsonl.zst").write_bytes(b"this is not zstd at all\n")
    with pytest.raises(DataError, match=r"junk.jsonl.zst is not a valid zstd file"):
        list(iter_documents([tmp_path / "junk.jsonl.zst"]))


def test_parquet_column_errors_name_the_file_the_columns_and_the_fix(tmp_path, docs):
    write_parquet(tmp_path / "e.parquet", docs[:10])
    with pytest.raises(
        DataError, match=r"e.parquet: no column 'body' \(found \['id', 'text', 'url'\]\); pass --text-field"
    ):
        list(iter_documents([tmp_path / "e.parquet"], text_field="body"))
    with pytest.raises(DataError, match=r"e.parquet: column 'id' is int64, not a string; pass --text-field"):
        list(iter_documents([tmp_path / "e.parquet"], text_field="id"))
    data = (tmp_path / "e.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut.parquet is not a readable Parquet file"):
        list(iter_documents([tmp_path / "cut.parquet"]))
    damaged = bytearray(data)
    for i in range(200, len(data) // 2, 997):  # the footer is intact, the data pages are not
        damaged[i] ^= 0xFF
    (tmp_path / "damaged.parquet").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"damaged.parquet is a damaged Parquet file .*re-download"):
        list(iter_documents([tmp_path / "damaged.parquet"]))


def test_windows_line_ends_read_as_the_unix_documents(tmp_path, docs):
    """The tokenizer keeps whitespace and has no piece for a lone "\\r": a CRLF corpus cost one
    byte-fallback token per line (measured: 8.8% of a prepared text file's tokens, and
    inspect_data's warning that the tokenizer hardly covers the text). CRLF is read as "\\n" in
    every format, so the documents and shards are those of the LF corpus (the reference)."""
    from pretrain.data import train_tokenizer

    texts = docs[:12]
    crlf = [t.replace("\n", "\r\n") for t in texts]
    assert all("\r\n" in t for t in crlf)
    for name, rows in (("lf", texts), ("crlf", crlf)):
        (tmp_path / name).mkdir()
        write_jsonl(tmp_path / name / "a.jsonl", [{"text": t} for t in rows])
        with gzip.open(tmp_path / name / "b.jsonl.gz", "wt") as fh:
            fh.write("".join(json.dumps({"text": t}) + "\n" for t in rows))
        write_parquet(tmp_path / name / "c.parquet", rows)
        (tmp_path / name / "d.txt").write_bytes(rows[0].encode())
    assert list(iter_documents([tmp_path / "crlf"])) == list(iter_documents([tmp_path / "lf"]))
    (tmp_path / "lf.txt").write_bytes("\n\n".join(texts[:3]).encode())
    (tmp_path / "crlf.txt").write_bytes("\r\n\r\n".join(crlf[:3]).encode())
    lf_blocks = list(iter_documents([tmp_path / "lf.txt"], "blocks"))
    assert list(iter_documents([tmp_path / "crlf.txt"], "blocks")) == lf_blocks and len(lf_blocks) > 3
    tok = train_tokenizer(texts, tmp_path / "t.model", 2000)
    out = {}
    for name in ("lf", "crlf"):
        manifest = prepare_corpus(
            [tmp_path / name],
            tmp_path / f"ds-{name}",
            64,
            tokenizer_path=tok.path,
            val_fraction=0.2,
            show_progress=False,
        )
        out[name] = {
            p.relative_to(tmp_path / f"ds-{name}"): p.read_bytes() for p in (tmp_path / f"ds-{name}").rglob("*.tar")
        }
        assert manifest["documents"] == 3 * len(texts) + 1
    assert out["crlf"] == out["lf"] and out["lf"]


def test_a_byte_order_mark_at_a_files_start_is_dropped(tmp_path, docs):
    """Windows editors start a UTF-8 file with a byte order mark (EF BB BF): a JSONL file so saved
    was refused at its first line ('invalid JSON (Unexpected UTF-8 BOM ...)'), and a text file's
    document began with U+FEFF, three byte-fallback tokens. The documents of files with a BOM equal
    those of the same files without one (the reference), in every line-read format, compressed too;
    a U+FEFF inside the text is text and stays."""
    texts = [docs[0], "\ufeffinner mark kept", docs[1]]
    for name, bom in (("plain", b""), ("bom", b"\xef\xbb\xbf")):
        (tmp_path / name).mkdir()
        jsonl = bom + "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()
        (tmp_path / name / "a.jsonl").write_bytes(jsonl)
        (tmp_path / name / "b.jsonl.gz").write_bytes(gzip.compress(jsonl))
        (tmp_path / name / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
        (tmp_path / name / "d.txt").write_bytes(bom + texts[0].encode())
        (tmp_path / name / "e.md").write_bytes(bom + "\n\n".join(texts).encode())
    for fmt in ("auto", "blocks"):
        got = list(iter_documents([tmp_path / "bom"], fmt))
        assert got == list(iter_documents([tmp_path / "plain"], fmt))
        assert not any(d.startswith("\ufeff") for d in got if "inner mark" not in d)
    assert "\ufeffinner mark kept" in list(iter_documents([tmp_path / "bom" / "a.jsonl"]))


def test_utf16_text_is_refused_with_the_conversion(tmp_path, docs):
    """Windows PowerShell 5 writes UTF-16 (`>`, Out-File). Such a file in an input folder was skipped
    as 'not text (...; a tokenizer.model beside the corpus, say)', the user's text dropped for a wrong
    reason; named itself it was read as UTF-8, every other byte NUL. Both are refused naming the file
    and the conversion; the converted file reads as the text (Python's UTF-16 codec as the reference)."""
    text = docs[0].replace("\n", "\r\n")
    for name, encoding in (("le.txt", "utf-16"), ("be.jsonl", "utf-16-be")):
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        body = text if name.endswith(".txt") else json.dumps({"text": text}) + "\r\n"
        data = body.encode(encoding)
        if encoding == "utf-16-be":
            data = b"\xfe\xff" + data
        (folder / name).write_bytes(data)
        (folder / "other.txt").write_text("another document\n")
        for inputs in ([folder], [folder / name]):
            with pytest.raises(DataError, match=rf"{name} is UTF-16 text .* iconv -f UTF-16 -t UTF-8 ") as err:
                list(iter_documents(inputs))
        # the conversion named, run as written, converts the file in place (until 2026-12-07: a copy beside
        # it, and the folder, which still held the UTF-16 file, was refused all the same)
        command = str(err.value).split("convert it in place, e.g. ")[1]
        assert command.startswith(f"iconv -f UTF-16 -t UTF-8 {folder / name} > ")
        subprocess.run(["bash", "-c", command], check=True)
        assert (folder / name).read_bytes() == data.decode("utf-16").encode()  # Python's codec as the reference
        assert sorted(iter_documents([folder])) == sorted([docs[0], "another document\n"])


def test_bz2_and_xz_read_as_the_plain_documents_and_archives_are_refused(tmp_path, docs):
    """A .jsonl.bz2 (Wikipedia dumps ship as bzip2) or .jsonl.xz was read as one plain-text document of
    compressed bytes, without an error (measured: the licenses corpus as .bz2 prepared as 1 document of
    82,810 tokens, exit 0; .xz 81,087; a .zip 64,894). bzip2 and xz are now read as streams like .gz
    (the same documents as the plain JSONL, the reference), a damaged one is named, and archives
    (.zip, .tar.gz, ...) and Arrow files are refused before any document is read, naming the fix."""
    import bz2
    import lzma
    import tarfile
    import zipfile

    rows = [{"text": t} for t in docs[:40]]
    write_jsonl(tmp_path / "plain.jsonl", rows)
    data = (tmp_path / "plain.jsonl").read_bytes()
    (tmp_path / "a.jsonl.bz2").write_bytes(bz2.compress(data))
    (tmp_path / "b.jsonl.xz").write_bytes(lzma.compress(data))
    (tmp_path / "c.txt.xz").write_bytes(lzma.compress(docs[0].encode()))
    reference = list(iter_documents([tmp_path / "plain.jsonl"]))
    assert list(iter_documents([tmp_path / "a.jsonl.bz2"])) == reference
    assert list(iter_documents([tmp_path / "b.jsonl.xz"])) == reference
    assert list(iter_documents([tmp_path / "c.txt.xz"])) == [docs[0]]
    for name, packed in (("cut.jsonl.bz2", bz2.compress(data)), ("cut.jsonl.xz", lzma.compress(data))):
        (tmp_path / name).write_bytes(packed[: len(packed) // 2])
        tool = "bzip2" if name.endswith("bz2") else "xz"
        with pytest.raises(DataError, match=rf"{name} is not a complete {tool} file .*`{tool} -t` checks it"):
            list(iter_documents([tmp_path / name]))
    (tmp_path / "junk.jsonl.bz2").write_bytes(b"not compressed at all\n" * 20)
    with pytest.raises(DataError, match=r"junk.jsonl.bz2 is not a complete bzip2 file"):
        list(iter_documents([tmp_path / "junk.jsonl.bz2"]))
    with zipfile.ZipFile(tmp_path / "corpus.zip", "w") as z:
        z.writestr("plain.jsonl", data)
    with tarfile.open(tmp_path / "corpus.tar.gz", "w:gz") as t:
        t.add(tmp_path / "plain.jsonl", arcname="plain.jsonl")
    (tmp_path / "data-00000-of-00001.arrow").write_bytes(b"\xff\xff\xff\xff" + bytes(64))
    for name, fix in (("corpus.zip", "is an archive.*extract it"), ("corpus.tar.gz", "is an archive"),
                      ("data-00000-of-00001.arrow", r"is an Arrow file .*to_parquet")):  # fmt: skip
        with pytest.raises(DataError, match=rf"--input: .*{name} {fix}"):
            next(iter_documents([tmp_path / name]))
    # in a folder too (datasets' save_to_disk: .arrow files beside its JSON metadata), before any warning
    saved = tmp_path / "saved" / "train"
    saved.mkdir(parents=True)
    shutil.copyfile(tmp_path / "data-00000-of-00001.arrow", saved / "data-00000-of-00001.arrow")
    (saved / "dataset_info.json").write_text('{\n  "citation": ""\n}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError, match=r"data-00000-of-00001.arrow is an Arrow file"):
            next(iter_documents([tmp_path / "saved"]))


def test_a_folder_of_text_skips_its_archives_and_a_folder_of_archives_is_refused(tmp_path, docs):
    """One archive anywhere under a folder refused the whole folder: /usr/share/doc was refused for the two
    test reports under openjdk-17-jre-headless/test-amd64/*.tar.gz (2.2 MB beside 115 MB of text). A
    folder's (or glob's) archives are now skipped with one warning naming them and how to read them;
    where the archives hold most of the bytes (a corpus shipped as archive shards beside its README, or
    nothing but archives) the corpus is in them, and the folder is refused, naming them and the fix."""
    import tarfile

    def pack(path, texts):
        with tarfile.open(path, "w:gz") as t:
            for i, text in enumerate(texts):
                (tmp_path / f"member{i}.txt").write_text(text)
                t.add(tmp_path / f"member{i}.txt", arcname=f"member{i}.txt")

    doc = tmp_path / "doc"
    for name, text in (("a/README", docs[0]), ("b/notes.txt", docs[1]), ("c/NEWS", docs[2])):
        (doc / name).parent.mkdir(parents=True, exist_ok=True)
        (doc / name).write_text(text)
    (doc / "c" / "test").mkdir()
    pack(doc / "c" / "test" / "report.tar.gz", ["a test log\n"])
    (doc / "c" / "test" / "sources.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    reference = [doc / "a/README", doc / "b/notes.txt", doc / "c/NEWS"]
    expected = list(iter_documents(reference))
    assert expected == docs[:3]
    for inputs in ([doc], [f"{doc}/**/*"]):
        with pytest.warns(UserWarning) as caught:
            assert list(iter_documents(inputs)) == expected
        said = [str(w.message) for w in caught if "archive" in str(w.message)]
        assert len(said) == 1, said
        assert re.search(
            r"skipped 2 archive\(s\) \(.*report.tar.gz, .*sources.zip; [\d,]+ bytes\).*extract them", said[0]
        )
    with pytest.raises(DataError, match=r"report.tar.gz is an archive"):  # a named archive is still refused
        next(iter_documents([doc / "c" / "test" / "report.tar.gz"]))

    shipped = tmp_path / "shipped"  # the corpus in archive shards, a short card beside them
    shipped.mkdir()
    (shipped / "README.md").write_text("# My corpus\n\nTwo shards of text.\n")
    pack(shipped / "part-0.tar.gz", docs[:20])
    pack(shipped / "part-1.tar.gz", docs[20:40])
    only = tmp_path / "only"
    only.mkdir()
    shutil.copyfile(shipped / "part-0.tar.gz", only / "part-0.tar.gz")
    for folder, names in ((shipped, "part-0.tar.gz, part-1.tar.gz"), (only, "part-0.tar.gz")):
        with pytest.raises(DataError, match=rf"archive\(s\) \({names}\) hold most of its data.*extract them"):
            next(iter_documents([folder]))


def test_parquet_batches_of_long_documents_hold_about_the_byte_budget(tmp_path, docs, monkeypatch):
    """A Parquet file was decoded 1024 rows at a time whatever their length: a row group of 1,100
    documents of 512K characters peaked at 3.3 GB read through iter_documents, 1.75 GB now. Each row group
    is read in batches of about PARQUET_BATCH_BYTES of text by its average row (the file's metadata), at
    most PARQUET_BATCH_ROWS rows; the documents are the same. The reference: the text bytes of each batch
    decoded, counted from the batches pyarrow hands out (the budget is shrunk here)."""
    from pretrain.data import corpus as corpus_mod

    budget = 200_000
    monkeypatch.setattr(corpus_mod, "MAX_TEXT_DOCUMENT_BYTES", 1 << 30)
    monkeypatch.setattr(corpus_mod, "PARQUET_BATCH_BYTES", budget)
    long_docs = [d * 20 for d in docs[:60]]  # tens of KB each
    short = ["a short document"] * 2500
    schema = pa.schema([("text", pa.string())])
    with pq.ParquetWriter(tmp_path / "mixed.parquet", schema) as writer:  # a row group of each
        writer.write_table(pa.table({"text": long_docs}, schema=schema))
        writer.write_table(pa.table({"text": short}, schema=schema))
    assert pq.ParquetFile(tmp_path / "mixed.parquet").metadata.num_row_groups == 2
    decoded = []
    iter_batches = pq.ParquetFile.iter_batches

    def recorded(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            decoded.append((batch.num_rows, sum(len(t.encode()) for t in batch.column(0).to_pylist())))
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", recorded)
    assert list(iter_documents([tmp_path / "mixed.parquet"])) == long_docs + short
    widest = max(len(d.encode()) for d in long_docs)
    ends = np.cumsum([rows for rows, _ in decoded])
    first_group = decoded[: int(np.searchsorted(ends, len(long_docs))) + 1]
    assert ends[len(first_group) - 1] == len(long_docs)  # no batch spans the two row groups
    assert len(first_group) > 5 and all(size <= 2 * budget + widest for _, size in first_group)
    assert [rows for rows, _ in decoded[len(first_group) :]] == [1024, 1024, 452]  # short rows: the row cap
