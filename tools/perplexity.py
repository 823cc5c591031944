"""Next-token loss and perplexity of an export on a prepared dataset's split (read once, in order).

python tools/perplexity.py exports/english --data data/english                 # the val split
python tools/perplexity.py exports/avg --data data/pydocs --split train --max-batches 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.cli import output_file, positive_int, torch_device  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", help="a folder written by memlayers-export")
    parser.add_argument("--data", required=True, help="a dataset written by memlayers-prepare-data")
    parser.add_argument("--split", default="val", help="the dataset split to score, whole: val (default) or train")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="sequences per forward pass")
    parser.add_argument(
        "--max-batches", type=positive_int, default=None, help="at most N batches (default: the whole split)"
    )
    parser.add_argument(
        "--document-masking",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="attention within each document (default: as the run trained, data.document_masking)",
    )
    parser.add_argument(
        "--device", type=torch_device, default="cpu", help="torch device to run the model on, e.g. cpu, cuda, cuda:1"
    )
    parser.add_argument("--json", type=output_file("loss.json"), help="also write the result to this file")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar on stderr (where stderr is not a terminal, the bar is a plain line every 30 s)",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from pretrain.data import DataError, read_manifest
    from pretrain.export.errors import ExportError
    from pretrain.export.folders import check_export_dir, export_tokenizer_path
    from pretrain.files import atomic_write
    from pretrain.model.config import ConfigError

    try:
        check_export_dir(args.export_dir)  # a missing or wrong folder refused before torch is imported
        export_tokenizer_path(args.export_dir)  # as are one without tokenizer.model,
        splits = read_manifest(args.data)["splits"]  # a missing --data folder, one that is no prepared dataset,
        if args.split not in splits:  # and a split it lacks
            choices = " or ".join(f"--split {name}" for name in sorted(splits))
            raise DataError(f"{args.data} has no split {args.split!r}: pass {choices}")
        if splits[args.split].get("sequences") == 0:  # as --val-fraction 0 leaves val: refused here, not after torch
            others = " or ".join(f"--split {name}" for name, split in sorted(splits.items()) if split.get("sequences"))
            raise DataError(
                f"the {args.split!r} split of {args.data} holds no sequences (a dataset prepared with --val-fraction 0 "
                f"has an empty 'val'): pass {others or 'a dataset with sequences'}"
            )
        from pretrain.export.perplexity import dataset_loss

        result = dataset_loss(
            args.export_dir,
            args.data,
            args.split,
            batch_size=args.batch_size,
            max_batches=args.max_batches or 0,
            document_masking=args.document_masking,
            device=args.device,
            show_progress=not args.no_progress,
        )
    except (DataError, ExportError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"export": args.export_dir, "data": args.data, "split": args.split, **result}
    print(
        f"{args.export_dir} on {args.data} ({args.split}): loss {result['loss']:.4f} perplexity "
        f"{result['perplexity']:.2f} over {result['tokens']:,} tokens ({result['sequences']} sequences"
        f"{', attention within documents' if result['document_masking'] else ''})"
    )
    if args.json:
        atomic_write(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
