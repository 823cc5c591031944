"""Preparing a corpus in slices (one per job, e.g. per Slurm array task), then merging them.

`prepare_slice(inputs, out_dir, tokenizer, i, n)` tokenizes slice i of n: the i-th of n
contiguous ranges of the sorted input files (so a corpus must come in at least n files to
keep every slice busy). It writes `<out_dir>.slices/slice-<i>-of-<n>/`: the documents' token
ids back to back (`tokens.bin`), their lengths (`lengths.npy`) and `slice.json` (files,
tokenizer hash, corpus statistics). Tokenizing is the CPU-heavy step and is what the slices
share out.

`merge_slices(out_dir, ...)` checks that all n slices are there and were made with one
tokenizer and one input list, then streams their documents, in slice order, through the same
`write_dataset` that a single-process `prepare_corpus` uses. Packing puts several documents
in one sequence and the validation split is drawn by document index, so this single
sequential pass (reading tokens, writing shards; no tokenizing) is what makes the merged
dataset identical to a single-process preparation: same sequences, same manifest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pretrain.data.corpus import CorpusStats, iter_documents
from pretrain.data.errors import DataError
from pretrain.data.input_files import resolve_files
from pretrain.data.prepare import check_output_dir, creation_record, tokenize_documents, write_dataset
from pretrain.data.shards import token_dtype_for
from pretrain.data.tokenizer import Tokenizer
from pretrain.files import atomic_directory

SLICE_FORMAT = 1


def parse_slice(text: str) -> tuple[int, int]:
    """'3/8' -> (3, 8); slices are numbered 0..n-1."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise DataError(f"--slice {text!r} must be i/N with 0 <= i < N (e.g. --slice 0/8 ... --slice 7/8)")
    return int(match[1]), int(match[2])


def slices_dir(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    return out_dir.with_name(out_dir.name + ".slices")


def slice_files(files: list[Path], i: int, n: int) -> list[Path]:
    return files[i * len(files) // n : (i + 1) * len(files) // n]


def prepare_slice(
    inputs: list[str | Path],
    out_dir: str | Path,
    tokenizer_path: str | Path,
    i: int,
    n: int,
    *,
    fmt: str = "auto",
    text_field: str = "text",
    workers: int = 1,
) -> Path:
    """Tokenize slice i of n into `<out_dir>.slices/slice-i-of-n`; return that folder."""
    if tokenizer_path is None:
        raise DataError(
            "--slice needs --tokenizer: every slice must use one tokenizer "
            "(train it first with tools/train_tokenizer.py)"
        )
    files = resolve_files(inputs, fmt=fmt)
    # the merge replaces out_dir: refused now, not after every slice
    check_output_dir(out_dir, inputs, overwrite=True, files=files)
    check_output_dir(slices_dir(out_dir), inputs, keep_contents=True, files=files)
    tokenizer = Tokenizer(tokenizer_path)
    mine = slice_files(files, i, n)
    dtype = token_dtype_for(tokenizer.vocab_size)
    stats = CorpusStats()
    target = slices_dir(out_dir) / f"slice-{i:05d}-of-{n:05d}"
    with atomic_directory(target) as tmp:
        lengths = []
        with open(tmp / "tokens.bin", "wb") as fh:
            if mine:
                for ids in tokenize_documents(iter_documents(mine, fmt, text_field, stats), tokenizer, workers):
                    fh.write(np.asarray(ids, dtype=dtype).tobytes())
                    lengths.append(len(ids))
        np.save(tmp / "lengths.npy", np.asarray(lengths, dtype=np.int64))
        (tmp / "slice.json").write_text(
            json.dumps(
                {
                    "format": SLICE_FORMAT,
                    "slice": i,
                    "of": n,
                    "files": [str(f) for f in mine],
                    "all_files": [str(f) for f in files],
                    "inputs": [str(p) for p in inputs],
                    "format_arg": fmt,
                    "text_field": text_field,
                    "tokenizer_sha256": tokenizer.sha256,
                    "token_dtype": dtype,
                    "stats": vars(stats),
                },
                indent=1,
            )
        )
    return target


def _read_slices(out_dir: Path) -> list[tuple[Path, dict]]:
    root = slices_dir(out_dir)
    found = sorted(root.glob("slice-*-of-*")) if root.is_dir() else []
    if not found:
        raise DataError(f"no slices in {root}: run tools/prepare_data.py --slice i/N --output {out_dir} first")
    metas = [(p, json.loads((p / "slice.json").read_text())) for p in found]
    n = metas[0][1]["of"]
    have = {m["slice"] for _, m in metas if m["of"] == n}
    if any(m["of"] != n for _, m in metas):
        raise DataError(
            f"{root} holds slices of different splits (of {sorted({m['of'] for _, m in metas})}): "
            "remove the stale ones and re-run those slices"
        )
    missing = sorted(set(range(n)) - have)
    if missing:
        raise DataError(
            f"{root} lacks slice(s) {missing} of {n}: run tools/prepare_data.py --slice "
            f"{missing[0]}/{n} (and the others) before --merge"
        )
    first = metas[0][1]
    for path, meta in metas:
        for key in ("tokenizer_sha256", "all_files", "format_arg", "text_field"):
            if meta[key] != first[key]:
                raise DataError(
                    f"{path} was made with another {key} than {metas[0][0]}: re-run every slice "
                    "with the same --input, --tokenizer, --format and --text-field"
                )
    return metas


def _documents(metas: list[tuple[Path, dict]]) -> Iterator[list[int]]:
    for path, meta in metas:
        lengths = np.load(path / "lengths.npy")
        dtype = np.dtype(meta["token_dtype"])
        size = (path / "tokens.bin").stat().st_size
        if size != int(lengths.sum()) * dtype.itemsize:
            raise DataError(
                f"{path}: tokens.bin ({size} bytes) does not match lengths.npy ({int(lengths.sum())} tokens of "
                f"{dtype.itemsize} bytes; an interrupted copy?): re-run that slice"
            )
        if not size:  # a slice without documents (mmap refuses an empty file)
            continue
        tokens = np.memmap(path / "tokens.bin", dtype=dtype, mode="r")  # paged in as read, not the whole slice
        start = 0
        for n in lengths.tolist():
            yield tokens[start : start + n].tolist()
            start += n


def merge_slices(
    out_dir: str | Path,
    tokenizer_path: str | Path,
    seq_len: int,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    sequences_per_shard: int = 4096,
    show_progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Combine all slices of `out_dir` into one dataset there; return its manifest."""
    out_dir = Path(out_dir)
    metas = _read_slices(out_dir)
    tokenizer = Tokenizer(tokenizer_path)
    first = metas[0][1]
    if tokenizer.sha256 != first["tokenizer_sha256"]:
        raise DataError(
            f"--tokenizer {tokenizer_path} is not the tokenizer the slices were made with "
            f"(sha256 {first['tokenizer_sha256'][:12]}): pass that one"
        )
    stats = CorpusStats()
    for _, meta in metas:
        for key, value in meta["stats"].items():
            setattr(stats, key, getattr(stats, key) + value)
    creation = creation_record(first["inputs"], first["format_arg"], first["text_field"], sequences_per_shard)
    return write_dataset(
        _documents(metas),
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
    )
