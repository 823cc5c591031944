"""Write real English text that ships with the machine (CPython's documentation topics, the
Debian license texts) as a JSONL corpus: the reproducible input of the recipe in docs/own-corpus.md.

  python tools/sample_corpus.py --output corpus/english.jsonl
  python tools/sample_corpus.py --output corpus/pydocs.jsonl --part python-docs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.cli import output_file  # noqa: E402
from pretrain.data.bundled_text import PARTS, write_bundled_corpus  # noqa: E402
from pretrain.data.errors import DataError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output", required=True, type=output_file("corpus.jsonl"), help="the .jsonl file to write")
    ap.add_argument("--part", nargs="+", default=list(PARTS), choices=PARTS, help="which texts (default: all)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        counts = write_bundled_corpus(args.output, args.part)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.output}: {counts['documents']} documents, {counts['characters']:,} characters ({', '.join(args.part)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
