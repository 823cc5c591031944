"""Rank memory slots for a text by TF-IDF against the export's slot-frequency table.

`memlayers-tfidf --export DIR --text "Where was Ada born?" --top 500` (or `--file PATH`, `-` for
stdin) prints, per memory
layer (or --layer), the top slots, their scores and the tokens that selected them (only slots
scoring above 0: one read in every table unit has idf 0, no sign of being specific). The text
is read as memlayers-smf-finetune reads a document (pretrain.smf.dataset.document_rows: a leading
<eos>, windows of the context, the last token only a target), so the ranking is that of the slots
sparse finetuning on it would pick. The
table (DIR/slot_frequencies.safetensors, or --table) must have been counted with this
export's model config and tokenizer; otherwise the tool refuses with exit status 2.
Logic lives in pretrain.slots.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from pretrain.cli import ends_quietly_when_the_reader_stops, positive_int  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--export",
        required=True,
        help="export directory (model.safetensors, config.json, tokenizer.model, slot_frequencies.safetensors)",
    )
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="text whose memory accesses are ranked")
    text.add_argument(
        "--file",
        metavar="PATH",
        help="read the text from a UTF-8 file, read whole as one document (- for stdin), instead of --text",
    )
    p.add_argument("--top", type=positive_int, default=500, help="list at most this many slots per layer")
    p.add_argument("--layer", default=None, help="memory layer name, e.g. layers.2 (default: all)")
    p.add_argument("--table", default=None, help="slot table to use instead of the export's")
    p.add_argument(
        "--allow-other-run",
        action="store_true",
        help="accept a --table counted in another training run (same config and tokenizer) than the export's",
    )
    return p


def read_text(path: str) -> str:
    """The text of --file: a UTF-8 file read whole (a document, as memlayers-smf-finetune reads a file), or
    stdin for `-`. Read before the export is loaded, so an unreadable file is named before any work."""
    if path == "-":
        return sys.stdin.buffer.read().decode("utf-8")
    return Path(path).read_text(encoding="utf-8")


@ends_quietly_when_the_reader_stops
def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.file is not None:
        try:
            args.text = read_text(args.file)
        except UnicodeDecodeError as err:
            print(f"error: --file {args.file} is not UTF-8 text (byte {err.start}: {err.reason})", file=sys.stderr)
            return 2
        except OSError as err:
            print(f"error: --file {args.file}: {err.strerror}", file=sys.stderr)
            return 2
    from pretrain.export.errors import ExportError
    from pretrain.export.folders import check_export_dir

    try:
        check_export_dir(args.export)  # a missing or wrong folder refused before torch is imported
        from pretrain.slots import load_export_for_tfidf, memory_layer_names, rank_slots  # torch (seconds)

        model, _cfg, table, tok_path = load_export_for_tfidf(args.export, args.table, args.allow_other_run)
    except (ExportError, FileNotFoundError, ValueError) as err:  # a TableMismatchError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not tok_path.is_file():
        print(f"error: {tok_path} missing: the export needs its tokenizer to encode the text", file=sys.stderr)
        return 2
    from pretrain.data import DataError, Tokenizer
    from pretrain.smf.dataset import collate, document_rows

    try:
        tokenizer = Tokenizer(tok_path)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # the rows sparse memory finetuning makes of this text ("<eos> tokens...", a text longer than
    # the context in windows, every row's last token only a target), so the slots ranked are those
    # memlayers-smf-finetune picks for it in one batch
    rows = document_rows(args.text, tokenizer, model.cfg.max_seq_len)
    if not rows:
        print(f"error: {'--file ' + args.file if args.file else '--text'} encodes to no tokens", file=sys.stderr)
        return 2
    batch = collate(rows)
    span, num_tokens = model.cfg.max_seq_len, int(batch.keep.sum())
    rankable = [n for n in memory_layer_names(model) if n in table.counts]
    if args.layer and args.layer not in rankable:
        why = (
            " (a value table shared by several layers: rank by one of its layers)" if args.layer in table.counts else ""
        )
        print(f"error: --layer {args.layer} cannot be ranked{why}; choose one of {rankable}", file=sys.stderr)
        return 2
    layers = [args.layer] if args.layer else rankable
    for layer in layers:
        ranked = rank_slots(model, batch.tokens, table, layer, top=args.top, keep=batch.keep)
        cut = f", the text's {num_tokens} input tokens in {len(rows)} windows of {span}" if len(rows) > 1 else ""
        shown = f"top {len(ranked)} of " if len(ranked) < ranked.scoring else ""
        print(
            f"# {layer}: {shown}{ranked.scoring} slots scoring above 0 (table step {table.step}, "
            f"{table.num_documents} {table.granularity} units{cut})"
        )
        print("rank\tslot\tscore\ttokens")
        for r, (slot, score, tokens) in enumerate(ranked, 1):
            pieces = " ".join(tokenizer.id_to_piece(t) for t in tokens)
            print(f"{r}\t{slot}\t{score:.6g}\t{pieces}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
