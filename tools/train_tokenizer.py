"""Train a sentencepiece tokenizer (BPE or unigram, byte fallback) on a sample of a corpus.

Text is kept as written: no normalization; newlines (one piece each), tabs and runs of spaces are
encoded, so every document decodes to itself.

python tools/train_tokenizer.py --input corpus/ --output tok.model --vocab-size 32000
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.cli import (  # noqa: E402
    StoppedBySignal,
    add_corpus_reading_options,
    fraction,
    output_file,
    plain_warnings,
    positive_int,
    stop_signals_exit,
)
from pretrain.data import DataError, iter_documents, train_tokenizer  # noqa: E402
from pretrain.data.corpus import check_record_files  # noqa: E402
from pretrain.data.input_files import resolve_files  # noqa: E402
from pretrain.data.tokenizer import sample_line  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files, directories or glob patterns (text, .jsonl, .parquet; .gz/.zst/.bz2/.xz compressed)",
    )
    ap.add_argument("--output", required=True, type=output_file("tokenizer.model"), help="the .model file to write")
    ap.add_argument(
        "--vocab-size",
        type=positive_int,
        default=32000,
        help="pieces in the tokenizer, at most (fewer when the sample holds no more)",
    )
    ap.add_argument(
        "--model-type",
        default="bpe",
        choices=["bpe", "unigram"],
        help="sentencepiece's algorithm: bpe (default) or unigram",
    )
    ap.add_argument(
        "--character-coverage",
        type=fraction("1: a piece for every character"),
        default=None,
        help="share of the text's characters (by occurrence) given pieces of their own, the commonest first; the "
        "rest are written as bytes (default 1.0 for bpe, 0.9995 for unigram; below 1 for text in many scripts)",
    )
    add_corpus_reading_options(ap)
    ap.add_argument(
        "--max-sentences",
        type=positive_int,
        default=200_000,
        help="at most this many lines, a seeded uniform sample of the whole corpus (memory bound)",
    )
    ap.add_argument(
        "--threads", type=positive_int, default=1, help="more is faster but may not be bit-reproducible (N >= 1)"
    )
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    started = time.monotonic()
    with stop_signals_exit():  # sentencepiece trains in a child process (minutes on a large sample)
        try:
            with plain_warnings():
                return _train(args)
        except (StoppedBySignal, KeyboardInterrupt) as stopped:
            signum = stopped.signum if isinstance(stopped, StoppedBySignal) else signal.SIGINT
        print(
            f"error: stopped by {signal.Signals(signum).name} after {time.monotonic() - started:.0f} s: no tokenizer "
            f"was written, {args.output} is as it was before",
            file=sys.stderr,
        )
        return 128 + signum


def _train(args: argparse.Namespace) -> int:
    try:
        files = resolve_files(args.input, fmt=args.format)
        check_record_files(files, args.format, args.text_field)
        tok = train_tokenizer(
            iter_documents(args.input, args.format, args.text_field, files=files),
            args.output,
            args.vocab_size,
            args.model_type,
            args.max_sentences,
            args.threads,
            character_coverage=args.character_coverage,
            on_sample=lambda size: print(sample_line(size, files, args.input), flush=True),
        )
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.output}: vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, sha256 {tok.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
