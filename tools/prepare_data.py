"""Tokenize a corpus into packed webdataset shards (train/ and val/) with a manifest.

  python tools/prepare_data.py --input corpus/ --output data/mycorpus --seq-len 1024 --vocab-size 32000
  python tools/prepare_data.py --input a.jsonl.gz --text-field content --tokenizer tok.model --output out
  python tools/prepare_data.py --embedded --config configs/tiny.yaml     # the embedded fact corpus

In slices (one job each, e.g. a Slurm array), then one merge (same --output and --tokenizer):
  python tools/prepare_data.py --input 'shards/*.jsonl.gz' --tokenizer tok.model --output data/big --slice 3/8
  python tools/prepare_data.py --merge --tokenizer tok.model --output data/big --seq-len 1024
"""

from __future__ import annotations

import argparse
import inspect
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.cli import (  # noqa: E402
    StoppedBySignal,
    add_corpus_reading_options,
    fraction,
    non_negative_number,
    output_folder,
    plain_warnings,
    positive_int,
    stop_signals_exit,
)
from pretrain.data import DataError, prepare_corpus, prepare_embedded_dataset, read_manifest  # noqa: E402
from pretrain.words import counted  # noqa: E402

# of the tokenizer trained on the corpus when no --tokenizer is given
DEFAULT_VOCAB_SIZE = inspect.signature(prepare_corpus).parameters["vocab_size"].default


_WHY = {
    signal.SIGTERM: "scancel, a time limit or preemption",
    signal.SIGUSR1: "Slurm's --signal warning",
    signal.SIGINT: "Ctrl-C",
}


def _stopped_message(signum: int, output: str | None, seconds: float) -> str:
    name = signal.Signals(signum).name
    where = f"{output} is as it was before" if output else "nothing was written"
    stopped = f"error: stopped by {name} ({_WHY[signum]}) after {seconds:.0f} s: the unfinished preparation was removed and {where}"
    if signum == signal.SIGINT:
        return f"{stopped}. A preparation does not resume midway: run the same command again"
    return (
        f"{stopped}. A preparation does not resume midway, and a job stopped by a signal is not requeued: run "
        "the same command again, with a longer time limit, or split the work across jobs with --slice i/N "
        "(each slice is kept once written) and --merge"
    )


def main(argv=None) -> int:
    started = time.monotonic()
    parsed: dict = {}
    # SIGTERM and USR1 would end the process at once and leave the hidden temporary folder with every
    # shard written so far beside --output; as an exit, the atomic writers remove it on the way out, as
    # they do for Ctrl-C, and a second stop of any kind waits for that. The tokenizer workers ignore all
    # three (pretrain/data/worker_pool.py) and are ended by this process.
    with stop_signals_exit():
        try:
            with plain_warnings():
                return _main(argv, parsed)
        except (StoppedBySignal, KeyboardInterrupt) as stopped:
            signum = stopped.signum if isinstance(stopped, StoppedBySignal) else signal.SIGINT
            print(_stopped_message(signum, parsed.get("output"), time.monotonic() - started), file=sys.stderr)
            return 128 + signum


def _main(argv, parsed: dict) -> int:
    """The tool; `parsed` gets the --output of the parsed arguments (for the stop message)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    parsed["output"] = args.output
    _refuse_tokenizer_options_that_are_not_read(ap, args)
    _refuse_options_of_the_other_mode(ap, args)
    try:
        if args.embedded:
            out, manifest = _prepare_embedded(args)
        elif args.slice:
            _prepare_slice(ap, args)
            return 0
        elif args.merge:
            out, manifest = args.output, _merge_slices(ap, args)
        else:
            out, manifest = args.output, _prepare_corpus(ap, args)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(_summary(out, manifest))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--input",
        nargs="+",
        help="files, directories or glob patterns (text, .jsonl, .parquet; .gz/.zst/.bz2/.xz compressed)",
    )
    ap.add_argument("--output", type=output_folder, help="dataset directory to create")
    ap.add_argument(
        "--seq-len",
        type=positive_int,
        default=1024,
        help="tokens per training sequence; must be <= the model's model.max_seq_len",
    )
    ap.add_argument("--tokenizer", help="an existing sentencepiece model; default: train one on the corpus")
    ap.add_argument(
        "--vocab-size",
        type=positive_int,
        default=None,
        help=f"when training the tokenizer (default {DEFAULT_VOCAB_SIZE}; refused with --tokenizer or --embedded)",
    )
    ap.add_argument(
        "--character-coverage",
        type=fraction("1: a piece for every character"),
        default=None,
        help="when training the tokenizer: share of the characters given pieces, the rest written as bytes "
        "(default 1.0; as tools/train_tokenizer.py; refused with --tokenizer or --embedded)",
    )
    add_corpus_reading_options(ap)
    ap.add_argument(
        "--val-fraction",
        type=non_negative_number("below 1; 0: no validation split"),
        default=0.01,
        help="share of the documents held out for the val split (by a seeded hash of each document's index; 0: no val split)",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the documents' draw into train and val")
    ap.add_argument("--sequences-per-shard", type=positive_int, default=4096, help="sequences per shard file")
    ap.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1), help="tokenizer processes")
    ap.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output when it is a prepared dataset (any other folder: refused)",
    )
    ap.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars on stderr (where stderr is not a terminal, each bar is a plain line every 30 s)",
    )
    ap.add_argument(
        "--slice",
        help="i/N: tokenize only slice i of N (contiguous ranges of the sorted input files) "
        "into OUTPUT.slices/; needs --tokenizer",
    )
    ap.add_argument("--merge", action="store_true", help="combine all slices of OUTPUT.slices/ into OUTPUT")
    ap.add_argument("--embedded", action="store_true", help="build the embedded fact corpus of --config")
    ap.add_argument("--config", default="configs/tiny.yaml", help="the run config whose data section --embedded builds")
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value (with --embedded)")
    return ap


def _refuse_tokenizer_options_that_are_not_read(ap: argparse.ArgumentParser, args) -> None:
    """--vocab-size and --character-coverage shape a tokenizer trained on the corpus, which
    --tokenizer (used as it is) and --embedded (sized by its config) do not train."""
    if args.vocab_size is not None and args.tokenizer:
        ap.error(
            f"--vocab-size {args.vocab_size} sizes a tokenizer trained on the corpus, but --tokenizer "
            f"{args.tokenizer} is used as it is, with its own vocabulary: drop --vocab-size (or --tokenizer)"
        )
    if args.vocab_size is not None and args.embedded:
        ap.error(f"--vocab-size {args.vocab_size} and --embedded: the config sizes it, pass data.vocab_size=N instead")
    if args.character_coverage is not None and (args.tokenizer or args.embedded):
        ap.error(
            f"--character-coverage {args.character_coverage} shapes a tokenizer trained on the corpus, but "
            f"{'--tokenizer is used as it is' if args.tokenizer else '--embedded builds its own'}: drop it"
        )


# The options that shape a corpus's dataset, which --embedded does not read (its config does), with the
# config key that does the same there, where there is one.
_CORPUS_SHAPING = {
    "seq_len": "data.seq_len",
    "val_fraction": "data.val_fraction",
    "sequences_per_shard": "data.sequences_per_shard",
    "seed": "data.synthetic.seed",
    "format": None,
    "text_field": None,
    "workers": None,
    "overwrite": None,
}


def _refuse_options_of_the_other_mode(ap: argparse.ArgumentParser, args) -> None:
    """--embedded builds the fact corpus of --config into its content-keyed cache folder (where
    training finds it by itself); the corpus options are not read there, and the config and its
    overrides are read only there. Either way a given option would be silently dropped."""
    if args.embedded:
        given = [f"--{name}" for name in ("input", "output", "tokenizer", "slice") if getattr(args, name)]
        given += ["--merge"] if args.merge else []
        if given:
            ap.error(
                f"{' and '.join(given)} with --embedded: the embedded fact corpus is built from --config "
                "into its cache folder (data.cache_dir, printed at the end), which training finds by itself; "
                f"drop {' and '.join(given)} (or --embedded, to prepare a corpus of your own)"
            )
        unread = [name for name in _CORPUS_SHAPING if getattr(args, name) != ap.get_default(name)]
        if unread:
            shown = " and ".join(
                f"--{name.replace('_', '-')}" + ("" if getattr(args, name) is True else f" {getattr(args, name)}")
                for name in unread
            )
            keys = [f"{_CORPUS_SHAPING[name]}={getattr(args, name)}" for name in unread if _CORPUS_SHAPING[name]]
            ap.error(
                f"{shown} with --embedded: the embedded fact corpus is shaped by --config and its overrides, "
                f"not by this tool's corpus options; drop {'them' if len(unread) > 1 else 'it'}"
                + (f" and pass {' '.join(keys)} instead" if keys else "")
            )
    elif args.overrides or args.config != ap.get_default("config"):
        what = " ".join(args.overrides) if args.overrides else f"--config {args.config}"
        ap.error(
            f"{what}: the config and its overrides are read only with --embedded; a corpus of your own is "
            "shaped by this tool's options (--seq-len, --vocab-size, ...; see --help)"
        )


def _prepare_embedded(args) -> tuple[str, dict]:
    from pretrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=not args.no_progress)
    return out, read_manifest(out)


def _prepare_slice(ap: argparse.ArgumentParser, args) -> None:
    from pretrain.data.slices import parse_slice, prepare_slice

    if not args.input or not args.output:
        ap.error("--slice needs --input and --output")
    i, n = parse_slice(args.slice)
    done = prepare_slice(
        args.input,
        args.output,
        args.tokenizer,
        i,
        n,
        fmt=args.format,
        text_field=args.text_field,
        workers=args.workers,
    )
    print(f"{done}: slice {i} of {n} tokenized; run --merge --output {args.output} when all are done")


def _merge_slices(ap: argparse.ArgumentParser, args) -> dict:
    from pretrain.data.slices import merge_slices

    if not args.output or not args.tokenizer:
        ap.error("--merge needs --output and --tokenizer (the ones the slices used)")
    return merge_slices(
        args.output,
        args.tokenizer,
        args.seq_len,
        val_fraction=args.val_fraction,
        seed=args.seed,
        sequences_per_shard=args.sequences_per_shard,
        show_progress=not args.no_progress,
        overwrite=args.overwrite,
    )


def _prepare_corpus(ap: argparse.ArgumentParser, args) -> dict:
    if not args.input or not args.output:
        ap.error("--input and --output are required (or pass --embedded)")
    return prepare_corpus(
        args.input,
        args.output,
        args.seq_len,
        tokenizer_path=args.tokenizer,
        vocab_size=DEFAULT_VOCAB_SIZE if args.vocab_size is None else args.vocab_size,
        character_coverage=args.character_coverage,
        fmt=args.format,
        text_field=args.text_field,
        val_fraction=args.val_fraction,
        seed=args.seed,
        sequences_per_shard=args.sequences_per_shard,
        workers=args.workers,
        show_progress=not args.no_progress,
        overwrite=args.overwrite,
        on_sample=lambda line: print(line, flush=True),  # as train_tokenizer.py says it
    )


def _summary(out, manifest: dict) -> str:
    """One line: each split's documents, tokens, sequences and shards, then the corpus statistics."""
    splits = "; ".join(
        f"{s}: {counted(v['documents'], 'document')}, {counted(v['tokens'], 'token')}, "
        f"{counted(v['sequences'], 'sequence')}, {counted(len(v['shards']), 'shard')}"
        for s, v in manifest["splits"].items()
    )
    return f"{out}: {splits}; stats {manifest['stats']}"


if __name__ == "__main__":
    sys.exit(main())
