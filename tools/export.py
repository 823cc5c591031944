"""Export a training checkpoint (run dir or checkpoint folder) to a portable model folder.

python tools/export.py runs/tiny exports/tiny [--dtype bf16] [--force] [--report-memory]
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_failure(err: OSError, out_dir: Path) -> str:
    """What an export that the filesystem refused says: the reason, the space left, the fix."""
    import errno

    from pretrain.refused_writes import free_bytes, mib

    free = free_bytes(out_dir)
    free = f"; {mib(free)} free there" if free is not None else ""
    reason = f"{err.strerror or err}{f' ({err.filename})' if err.filename else ''}{free}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space (the export needs about the size of its model.safetensors), or give another out_dir"
    else:
        fix = "fix that, or give another out_dir"
    return f"could not export to {out_dir} ({reason}): nothing was left there; {fix}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="run directory, its checkpoints/ folder, or one checkpoints/step_XXXXXXXX")
    parser.add_argument("out_dir", help="export folder to create")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="dtype of the written weights: fp32 (default) or bf16 (half the size)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing out_dir")
    parser.add_argument(
        "--dataset-dir",
        default=None,
        help="the prepared dataset the run used (for tokenizer.model); default: from the run's config",
    )
    parser.add_argument("--report-memory", action="store_true", help="print peak RSS against the weights' size")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from pretrain.export.errors import ExportError
    from pretrain.export.folders import resolve_checkpoint_dir

    try:
        resolve_checkpoint_dir(args.source)  # a missing or wrong run folder refused before torch is imported
        from pretrain.export import export_checkpoint

        out = export_checkpoint(
            args.source, args.out_dir, dtype=args.dtype, force=args.force, dataset_dir=args.dataset_dir
        )
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or quota while writing (the unfinished folder is removed)
        print(f"error: {write_failure(err, Path(args.out_dir))}", file=sys.stderr)
        return 2
    weights = (out / "model.safetensors").stat().st_size
    print(f"exported to {out} (model.safetensors {weights / 2**20:.1f} MiB)")
    if args.report_memory:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        print(f"peak RSS {peak / 2**20:.1f} MiB = {peak / weights:.2f} x the exported weights")
    return 0


if __name__ == "__main__":
    sys.exit(main())
