"""From documents to a prepared dataset: tokenize (several processes), split, pack, shard.

`write_dataset` consumes token lists in order, skips (and counts) empty ones, assigns
each document to train or val by a hash of (seed, its index among non-empty documents),
numbers documents train first then val, in input order, and writes both splits plus `manifest.json` and `tokenizer.model`
into a temporary directory that is renamed to the output at the end.
`prepare_corpus` is the whole path for real corpora (what tools/prepare_data.py runs).
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from collections import deque
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from pretrain.data.corpus import CorpusStats, check_record_files, input_bytes, iter_documents, most_documents
from pretrain.data.errors import DataError
from pretrain.data.input_files import resolve_files
from pretrain.data.shards import FORMAT, ShardWriter, token_dtype_for, write_manifest
from pretrain.data.tokenizer import SampleSize, Tokenizer, sample_line, train_tokenizer
from pretrain.data.worker_pool import ordered_map
from pretrain.files import atomic_directory
from pretrain.progress_bars import progress_bar

_MASK64 = (1 << 64) - 1
# Characters sent to the tokenizer at once (see tokenize_documents): the bar of input read moves by about
# this much.
CHUNK_CHARS = 1 << 20
_worker_tokenizer: Tokenizer | None = None


def is_validation(doc_id: int, seed: int, val_fraction: float) -> bool:
    """A fixed pseudo-random draw per (seed, doc id) (splitmix64), independent of order."""
    z = (doc_id * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z / 2**64 < val_fraction


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = Tokenizer(path)


def _encode_in_worker(chunk: tuple[list[str], list[bool], list[float]]) -> tuple[list[float], list[np.ndarray]]:
    texts, continued, shares = chunk
    return shares, _worker_tokenizer.encode_pieces(texts, continued)


def _chunks(
    documents: Iterable[str], tokenizer: Tokenizer, max_pieces: int, max_chars: int
) -> Iterator[tuple[list[str], list[bool], list[float]]]:
    """(texts, continued, shares): the documents cut by `tokenizer.cut_document`, gathered until a chunk
    holds `max_pieces` pieces or `max_chars` characters; a piece's share is that of its document's
    characters up to its end (1.0 at a document's last piece, below it before)."""
    texts: list[str] = []
    continued: list[bool] = []
    shares: list[float] = []
    chars = 0
    for doc in documents:
        done = 0
        for i, piece in enumerate(tokenizer.cut_document(doc)):
            done += len(piece)
            texts.append(piece)
            continued.append(i > 0)
            shares.append(done / len(doc) if doc else 1.0)  # "" (the API allows one): a whole document
            chars += len(piece)
            if len(texts) == max_pieces or chars >= max_chars:
                yield texts, continued, shares
                texts, continued, shares, chars = [], [], [], 0
    if texts:
        yield texts, continued, shares


def tokenize_documents(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    workers: int = 1,
    chunk_docs: int = 256,
    chunk_chars: int = CHUNK_CHARS,
    partly_encoded: Callable[[float], None] | None = None,
) -> Iterator[np.ndarray]:
    """Token ids (int32) per document, in input order; `workers` > 1 tokenizes in that many processes.
    Documents go to the tokenizer in chunks of at most `chunk_docs` pieces or about `chunk_chars`
    characters, and a long document in pieces (Tokenizer.cut_document: the same ids as encoded whole),
    so that the text in flight, and sentencepiece's memory for it, stay bounded: 256 documents near the
    64 MiB limit were 16 GB of text per chunk, and each such document took 3.1 GB to encode.
    `partly_encoded`: called as each piece of the next document but its last is encoded, with the share
    of that document's characters encoded by then (prepare_corpus moves its bar within a long document)."""
    chunks = _chunks(documents, tokenizer, chunk_docs, chunk_chars)
    if workers <= 1:
        encoded = ((ends, tokenizer.encode_pieces(texts, continued)) for texts, continued, ends in chunks)
    else:
        # processes that a stop signal does not kill and whose death is noticed (pretrain/data/worker_pool.py)
        encoded = ordered_map(_encode_in_worker, chunks, workers, _init_worker, (str(tokenizer.path),))
    parts: list[np.ndarray] = []
    for shares, ids in encoded:
        for share, piece_ids in zip(shares, ids):
            parts.append(piece_ids)
            if share == 1.0:  # the document's last piece
                yield parts[0] if len(parts) == 1 else np.concatenate(parts)
                parts = []
            elif partly_encoded is not None:
                partly_encoded(share)


def write_dataset(
    token_docs: Iterable[np.ndarray | list[int]],
    out_dir: str | Path,
    tokenizer: Tokenizer,
    seq_len: int,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    sequences_per_shard: int | dict[str, int] = 4096,
    rows_per_block: int = 256,
    creation: dict | None = None,
    corpus_stats: CorpusStats | None = None,
    extra_files: dict[str, Path] | None = None,
    show_progress: bool = True,
    overwrite: bool = False,
    written: Callable[[], None] | None = None,
) -> dict:
    """Write train/ and val/ shards, tokenizer.model and manifest.json; return the manifest.
    `written`: called for each document as it is packed, empty ones too (prepare_corpus moves its bar of
    input read)."""
    out_dir = Path(out_dir)
    check_settings(seq_len, val_fraction, sequences_per_shard)
    check_output_dir(out_dir, overwrite=overwrite)
    per_split = (
        sequences_per_shard
        if isinstance(sequences_per_shard, dict)
        else {"train": sequences_per_shard, "val": sequences_per_shard}
    )
    with atomic_directory(out_dir) as tmp:
        dtype = token_dtype_for(tokenizer.vocab_size)
        writers = {
            s: ShardWriter(tmp, s, seq_len, tokenizer.eos_id, dtype, per_split[s], rows_per_block)
            for s in ("train", "val")
        }
        doc_id, empty_after_tokenizing = _write_documents(
            token_docs, writers, seed, val_fraction, show_progress, written
        )
        if doc_id == 0:
            raise DataError("the corpus holds no non-empty document: check --input and --format/--text-field")
        splits = {s: w.close() for s, w in writers.items()}
        _check_validation_split(splits, doc_id, val_fraction)
        splits["train"]["doc_id_offset"], splits["val"]["doc_id_offset"] = 0, splits["train"]["documents"]
        stats = dict(vars(corpus_stats)) if corpus_stats is not None else {}
        stats["empty_documents"] = stats.get("empty_documents", 0) + empty_after_tokenizing
        shutil.copyfile(tokenizer.path, tmp / "tokenizer.model")
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
        manifest = {
            "format": FORMAT,
            "seq_len": seq_len,
            "token_dtype": dtype,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "bos_id": tokenizer.bos_id,
            "pad_id": tokenizer.eos_id,
            "tokenizer_sha256": tokenizer.sha256,
            "seed": seed,
            "val_fraction": val_fraction,
            "rows_per_block": rows_per_block,
            "documents": doc_id,
            "splits": splits,
            "stats": stats,
            "creation": creation or {},
        }
        write_manifest(tmp, manifest)
    return manifest


def check_settings(seq_len: int, val_fraction: float, sequences_per_shard: int | dict[str, int] = 1) -> None:
    """Refuse values no preparation can use, naming the option: run before any input is read
    (training a tokenizer on the corpus may take a pass over all of it)."""
    if seq_len <= 0:
        raise DataError(f"seq_len={seq_len} must be positive (--seq-len)")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(
            f"val_fraction={val_fraction} must be in [0, 1) (--val-fraction: the share of documents held out, e.g. 0.01)"
        )
    counts = sequences_per_shard.values() if isinstance(sequences_per_shard, dict) else [sequences_per_shard]
    if any(n <= 0 for n in counts):
        raise DataError(f"sequences_per_shard={sequences_per_shard} must be positive (--sequences-per-shard)")


def check_output_dir(
    out_dir: str | Path,
    inputs: Iterable[str | Path] = (),
    overwrite: bool = False,
    keep_contents: bool = False,
    files: list[Path] | None = None,
) -> None:
    """Refuse (DataError) an output folder that cannot take a prepared dataset, before any input is
    read: a file; one of the `inputs` (files, folders, glob patterns) or a folder holding one
    (replacing it, --overwrite, would delete the corpus); a folder inside an input folder (a later
    run over that folder would read the shards and manifest as documents); a non-empty folder
    without `overwrite`, and with it one that is not a prepared dataset (no manifest.json: a folder
    of datasets, a run folder), which the replacement would delete whole. `keep_contents`: the
    folder is written into, never replaced (the slices folder), so what it holds may stay.
    `files`: resolve_files(inputs), where the caller has it."""
    out_dir = Path(out_dir)
    out = out_dir.resolve()
    inputs = list(inputs)
    folders = [Path(p) for p in inputs if Path(p).is_dir()]
    if files is None:
        files = resolve_files(inputs) if inputs else []
    for path, real in [*((f, f.resolve()) for f in folders), *zip(files, _real_paths(files))]:
        if out == real or out in real.parents:
            raise DataError(
                f"--output {out_dir} {'is' if out == real else 'holds'} the input {path}: writing the "
                "dataset there would delete it; choose an --output outside the corpus"
            )
    for folder in folders:
        if folder.resolve() in out.parents:
            raise DataError(
                f"--output {out_dir} is inside the input folder {folder}: a later run over {folder} would read "
                "the dataset's shards as documents; choose an --output outside the corpus"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"--output {out_dir} is a file, not a folder: name a folder to write the dataset into")
    if keep_contents or not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise DataError(f"output directory {out_dir} is not empty: choose another --output or pass --overwrite")
    if not (out_dir / "manifest.json").is_file():
        held = sorted(p.name for p in out_dir.iterdir())
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise DataError(
            f"--output {out_dir} holds files ({shown}) but is not a prepared dataset (no manifest.json): "
            "--overwrite replaces a dataset folder whole and would delete them; name the dataset's own "
            f"folder (e.g. {out_dir / 'mycorpus'}), or remove {out_dir} yourself"
        )


def _real_paths(files: list[Path]) -> Iterator[Path]:
    """Path.resolve() of each file, resolving each folder once: a folder of 20,000 files resolved
    file by file took 2 s (a realpath walks every component)."""
    folders: dict[Path, Path] = {}
    for f in files:
        if f.is_symlink():
            yield f.resolve()
            continue
        if f.parent not in folders:
            folders[f.parent] = f.parent.resolve()
        yield folders[f.parent] / f.name


def _write_documents(
    token_docs: Iterable[np.ndarray | list[int]],
    writers: dict,
    seed: int,
    val_fraction: float,
    show_progress: bool,
    written: Callable[[], None] | None = None,
) -> tuple[int, int]:
    """Route each non-empty document to its split's writer; return (documents written, empty ones).
    `written`: called after each document, empty ones (no tokens) too."""
    documents = empty = 0
    with progress_bar(total=None, unit="tok", unit_scale=True, desc="prepare", disable=not show_progress) as bar:
        for ids in token_docs:
            if written is not None:
                written()
            if len(ids) == 0:
                empty += 1
                continue
            split = "val" if is_validation(documents, seed, val_fraction) else "train"
            writers[split].add(ids)
            documents += 1
            bar.update(len(ids) + 1)
    return documents, empty


_FEW_DOCUMENTS = "a plain-text file is one document: --format blocks splits it at blank lines"


def check_validation_possible(files: list[Path], fmt: str, seed: int, val_fraction: float) -> None:
    """Refuse, before the corpus is read, a preparation whose validation split must come out empty: files
    read whole hold at most one document each, and documents are drawn for validation by their index alone
    (is_validation), so when no index below the file count is drawn, none can be. A 60 MiB text file was
    tokenized in full (12 s) before the empty split was found. Run once the first document is read (an empty
    corpus, or a file too large for one document, is named first)."""
    most = most_documents(files, fmt)
    if val_fraction > 0 and most is not None and not any(is_validation(i, seed, val_fraction) for i in range(most)):
        raise DataError(
            f"the validation split would be empty: the {most} input file(s), each read as one document, hold at "
            f"most {most} document(s), and none of those would fall into it at --val-fraction={val_fraction} (about "
            f"{most * val_fraction:.2g} expected); raise --val-fraction or add documents ({_FEW_DOCUMENTS}). "
            "Nothing was tokenized"
        )


def _check_validation_split(splits: dict, documents: int, val_fraction: float) -> None:
    """Training evaluates on the val split: refuse a preparation that left it empty by chance
    (nothing is written), and warn when it is empty by request (val_fraction=0). Warn too when the
    training split is empty (every document drawn for validation: one document, say): such a
    dataset can still be scored as data.eval_sources, but training on it alone is refused."""
    if not splits["train"]["shards"]:
        warnings.warn(
            f"the training split is empty: all {documents} document(s) fell into validation at "
            f"--val-fraction={val_fraction}, so training on this dataset will be refused (it can serve as "
            f"data.eval_sources); lower --val-fraction or add documents ({_FEW_DOCUMENTS})",
            stacklevel=3,
        )
    if splits["val"]["shards"]:
        return
    if val_fraction > 0:
        raise DataError(
            f"the validation split is empty: none of the {documents} documents fell into it at "
            f"--val-fraction={val_fraction} (about {documents * val_fraction:.2g} expected); raise --val-fraction "
            f"or add documents ({_FEW_DOCUMENTS}). Nothing was written"
        )
    warnings.warn(
        "--val-fraction=0: the dataset has no validation split, so training on it alone will be refused "
        "(the trainer evaluates on val); a mixture leaves it out of the validation loss, and data.eval_sources "
        "scores its training split",
        stacklevel=3,
    )


def creation_record(inputs: list, fmt: str, text_field: str, sequences_per_shard: int) -> dict:
    """The manifest's record of how a real corpus was prepared (one process or merged slices)."""
    return {
        "inputs": [str(p) for p in inputs],
        "format": fmt,
        "text_field": text_field,
        "sequences_per_shard": sequences_per_shard,
    }


def prepare_corpus(
    inputs: list[str | Path],
    out_dir: str | Path,
    seq_len: int,
    *,
    tokenizer_path: str | Path | None = None,
    vocab_size: int = 32000,
    character_coverage: float | None = None,
    fmt: str = "auto",
    text_field: str = "text",
    val_fraction: float = 0.01,
    seed: int = 0,
    sequences_per_shard: int = 4096,
    workers: int = 1,
    show_progress: bool = True,
    overwrite: bool = False,
    on_sample: Callable[[str], None] | None = None,
) -> dict:
    """Real corpus -> dataset. Trains a tokenizer on a sample when `tokenizer_path` is None
    (`vocab_size`, `character_coverage`: as train_tokenizer's); `on_sample` is then given the line that
    says what the sample holds (pretrain.data.tokenizer.sample_line, as train_tokenizer.py prints it),
    once the sample is drawn and before the training."""
    check_settings(seq_len, val_fraction, sequences_per_shard)
    files = resolve_files(inputs, fmt=fmt)  # once for every pass: missing inputs fail here, before any work
    check_output_dir(out_dir, inputs, overwrite, files=files)
    probe = CorpusStats()
    if next(iter_documents(inputs, fmt, text_field, probe, files=files), None) is None:
        raise DataError(
            f"the corpus {[str(p) for p in inputs]} holds no non-empty document "
            f"({probe.empty_documents} empty): check --input, --format and --text-field"
        )
    check_record_files(files, fmt, text_field)
    check_validation_possible(files, fmt, seed, val_fraction)
    total = input_bytes(files)
    # a folder for the tokenizer only where one is trained (a killed run leaves it behind)
    scratch = tempfile.TemporaryDirectory(prefix="tokenizer-") if tokenizer_path is None else nullcontext()
    with scratch as tmp:
        if tokenizer_path is None:
            with _reading("tokenizer sample", total, show_progress) as progress:
                documents = iter_documents(inputs, fmt, text_field, files=files, progress=progress)

                def drawn(size: SampleSize) -> None:
                    progress.finish()  # the bar's last line before the sample's (the training takes minutes)
                    if on_sample is not None:
                        on_sample(sample_line(size, files, inputs))

                tokenizer = train_tokenizer(
                    documents,
                    Path(tmp) / "tokenizer.model",
                    vocab_size,
                    character_coverage=character_coverage,
                    on_sample=drawn,
                )
        else:
            tokenizer = Tokenizer(tokenizer_path)
        stats = CorpusStats()
        creation = creation_record(inputs, fmt, text_field, sequences_per_shard)
        with _reading("read", total, show_progress) as progress:
            read_by: deque[int] = deque()  # per document read and not yet written: the input read by then
            documents = iter_documents(inputs, fmt, text_field, stats, files=files, progress=read_by.append)
            return write_dataset(
                tokenize_documents(
                    documents, tokenizer, workers, partly_encoded=lambda share: progress(read_by[0], share)
                ),
                out_dir,
                tokenizer,
                seq_len,
                val_fraction=val_fraction,
                seed=seed,
                sequences_per_shard=sequences_per_shard,
                creation=creation,
                corpus_stats=stats,
                show_progress=show_progress,
                overwrite=overwrite,
                written=lambda: progress(read_by.popleft()),
            )


class _ReadingBar:
    """A bar of the input bytes read (the token count alone, before, gave no sense of how far a
    preparation was: a 100 MB corpus ran 2 min 24 s showing 'prepare: 28.1Mtok'). Called as `bar(read)`
    it moves to a number of bytes read, as `bar(read, share)`, within a document read by then, to the
    `share` of the way from the last whole document to it (a 60 MiB document is ~50 s of tokenizing);
    `finish()` fills and closes it (empty documents after the last)."""

    def __init__(self, desc: str, total: int, show: bool):
        self.bar = progress_bar(total=total, unit="B", unit_scale=True, desc=desc, disable=not show)
        self.total = total
        self.whole = 0  # the input read by the last whole document

    def __call__(self, read: int, share: float = 1.0) -> None:
        self.bar.update(max(self.whole + int((read - self.whole) * share) - self.bar.n, 0))
        if share == 1.0:
            self.whole = max(self.whole, read)

    def finish(self) -> None:
        if not self.bar.disable:
            self.bar.update(self.total - self.bar.n)
        self.bar.close()


@contextmanager
def _reading(desc: str, total: int, show: bool) -> Iterator[_ReadingBar]:
    """A `_ReadingBar`, filled and closed at the end (or earlier by its `finish()`)."""
    bar = _ReadingBar(desc, total, show)
    try:
        yield bar
        bar.finish()
    finally:
        bar.bar.close()
