"""Look at a prepared dataset before training on it: the numbers of a split and its first rows.

  python tools/inspect_data.py data/english                     # train split, 2 rows decoded
  python tools/inspect_data.py data/english --split val --rows 0 --json val.json --plot lengths.png

Prints tokens, padding, documents and their length percentiles, the share of byte-fallback
tokens, the most frequent tokens, warnings (a tokenizer that hardly covers the text, mostly tiny
documents), and the first --rows rows decoded as the model reads them, "‖" after each document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.cli import (  # noqa: E402
    ends_quietly_when_the_reader_stops,
    image_file,
    int_at_least,
    output_file,
    refuse_one_file_for_two_outputs,
)
from pretrain.data.errors import DataError  # noqa: E402
from pretrain.data.inspect import decoded_rows, inspect_split  # noqa: E402
from pretrain.files import atomic_write, save_figure  # noqa: E402


def report_lines(r) -> list[str]:
    p = r.length_percentiles
    lines = [
        f"{r.split}: {r.sequences:,} rows of {r.seq_len} + 1 tokens, {r.tokens:,} tokens "
        f"({r.padding:,} padding), {r.documents:,} documents",
        f"document length in tokens (EOS included): mean {r.mean_length:.1f}, p10 {p['p10']:.0f}, "
        f"median {p['p50']:.0f}, p90 {p['p90']:.0f}, max {p['max']:.0f}; {r.short_documents:,} under 16",
        f"byte-fallback tokens: {100 * r.byte_fallback_share:.2f}%",
        "most frequent: " + ", ".join(f"{piece!r} {count:,}" for piece, count in r.top_tokens),
    ]
    return lines + [f"warning: {w}" for w in r.warnings()]


def plot_lengths(r, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.5))
    lengths = r.document_lengths
    bins = np.logspace(0, np.log10(max(2, lengths.max())), 40) if len(lengths) else 10
    ax.hist(lengths, bins=bins)
    ax.set(
        xscale="log",
        xlabel="document length (tokens)",
        ylabel="documents",
        title=f"{r.split}: {r.documents:,} documents",
    )
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", type=Path, help="a dataset folder written by tools/prepare_data.py")
    p.add_argument("--split", default="train", help="the split to inspect: train (default) or val")
    p.add_argument("--rows", type=int_at_least(0, "0: none"), default=2, help="rows decoded (0: none)")
    p.add_argument("--top", type=int_at_least(0, "0: none"), default=20, help="most frequent tokens listed")
    p.add_argument(
        "--json", type=output_file("inspect.json"), default=None, help="also write the statistics to this JSON file"
    )
    p.add_argument("--plot", type=image_file("lengths.png"), default=None, help="PNG of the document length histogram")
    return p


@ends_quietly_when_the_reader_stops
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    refuse_one_file_for_two_outputs(p, **{"--json": args.json, "--plot": args.plot})
    try:
        report = inspect_split(args.dataset, args.split, top=args.top)
        rows = decoded_rows(args.dataset, args.split, args.rows) if args.rows else []
    except DataError as err:
        print(f"inspect_data: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(report)))
    for i, text in enumerate(rows):
        print(f"--- row {i} ---\n{text}")
    if args.json:
        payload = {k: v for k, v in vars(report).items() if k != "document_lengths"}
        payload["warnings"] = report.warnings()
        payload["rows"] = rows
        atomic_write(args.json, json.dumps(payload, indent=2, ensure_ascii=False))
    if args.plot:
        plot_lengths(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
