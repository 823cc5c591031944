"""Finetune an export on new text: sparse memory finetuning, full finetuning or LoRA.

  memlayers-smf-finetune --export exports/tiny --data new_facts.jsonl --out exports/tiny-smf \
      --method sparse --top-t 500 --lr 2 --epochs 5

sparse: only the value rows of each batch's top-t TF-IDF slots (against the export's
slot_frequencies.safetensors) change, by SGD. full: AdamW on every weight. lora: peft
adapters on the attention/FFN projections, merged into the saved weights. After each
epoch it prints the loss and, when the export has probes.jsonl, new- and old-fact
recall (plus validation loss with --dataset-dir; for an export without probes.jsonl, a run on your
own text, --dataset-dir gives the validation loss alone). The new export's config.json keeps the
settings and every epoch's record (memlayers.finetune). Logic lives in pretrain.smf.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.cli import add_corpus_reading_options, non_negative_number, positive_int, positive_number, torch_device  # noqa: E402

DEFAULT_LR = {"sparse": 2.0, "full": 1e-4, "lora": 1e-3}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", required=True, help="export directory (tools/export.py)")
    p.add_argument("--data", required=True, nargs="+", help="finetuning text / JSONL files or directories")
    p.add_argument("--out", required=True, help="folder for the finetuned export")
    p.add_argument(
        "--method",
        choices=["sparse", "full", "lora"],
        default="sparse",
        help="sparse: only the memory value rows the batch reads most specifically (TF-IDF against the slot table); full: every weight; lora: low-rank adapters",
    )
    p.add_argument(
        "--lr",
        type=positive_number(),
        default=None,
        help=f"learning rate (default {DEFAULT_LR}; sparse: the paper's SGD lr. On configs/smf_tiny.yaml "
        "100 with --max-grad-norm 0.05 learns best: see docs/sparse-finetuning.md)",
    )
    p.add_argument(
        "--top-t", type=positive_int, default=None, help="sparse: value rows updated per batch (default 500)"
    )
    p.add_argument(
        "--max-grad-norm",
        type=non_negative_number("0 = off"),
        default=None,
        help="sparse: clip the norm of the selected rows' gradient per step (0 = off, the default)",
    )
    p.add_argument("--lora-rank", type=positive_int, default=None, help="lora: the adapters' rank (default 8)")
    p.add_argument("--epochs", type=positive_int, default=5, help="passes over the --data rows")
    p.add_argument("--eval-every", type=positive_int, default=1, help="evaluate every N epochs (and after the last)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=8,
        help="rows per step: a document each, or a window of one longer than the model's context",
    )
    p.add_argument("--shuffle", action="store_true", help="reshuffle documents every epoch (default: file order)")
    p.add_argument("--seed", type=int, default=0, help="seed of the row order (--shuffle) and of torch's random state")
    add_corpus_reading_options(p, "--data")
    p.add_argument("--table", default=None, help="slot table to rank against instead of the export's")
    p.add_argument(
        "--allow-other-run",
        action="store_true",
        help="accept a --table counted in another training run (same config and tokenizer) than the export's",
    )
    p.add_argument("--dataset-dir", default=None, help="pretraining dataset, for validation loss after each epoch")
    p.add_argument("--device", type=torch_device, default="cpu", help="cpu, or cuda / cuda:N")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.method != "sparse":
        for flag in ("table", "allow_other_run", "top_t", "max_grad_norm"):
            # identity, not `in (None, False)`: --max-grad-norm 0 is 0.0 == False, and was let through
            if getattr(args, flag) is not None and getattr(args, flag) is not False:
                p.error(f"--{flag.replace('_', '-')} is read only by --method sparse (it ranks the slots): drop it")
    if args.method != "lora" and args.lora_rank is not None:
        p.error(f"--lora-rank is read only by --method lora (the adapters' rank), not --method {args.method}: drop it")
    args.top_t = 500 if args.top_t is None else args.top_t
    args.lora_rank = 8 if args.lora_rank is None else args.lora_rank
    args.max_grad_norm = 0.0 if args.max_grad_norm is None else args.max_grad_norm
    if args.lr is None:
        args.lr = DEFAULT_LR[args.method]
    return args


def load_and_check(args):
    """(model, slot table or None, finetuning set, evaluation or None), every input
    checked before the model trains: the output folder, the data files, --dataset-dir's use, the
    table against the export (sparse), --lora-rank against the model (lora)."""
    from pretrain.data import Tokenizer
    from pretrain.data.input_files import resolve_files
    from pretrain.export import load
    from pretrain.export.perplexity import trained_with_document_masking
    from pretrain.export.writer import check_output_folder
    from pretrain.slots import load_export_for_tfidf
    from pretrain.smf import DataLossEval, FinetuneSet, LearningForgettingEval, ValidationLossEval, combined
    from pretrain.smf.methods import check_lora_rank

    export = Path(args.export)
    check_output_folder(Path(args.out), args.force, sources=[export])  # before the model loads and trains
    data_files = resolve_files(args.data, option="--data", fmt=args.format)  # before the model loads
    # --force replaces --out at the end: never with the data, table or dataset read (a corpus folder was deleted)
    check_output_folder(Path(args.out), args.force, sources=data_files, what="--data file")
    check_output_folder(Path(args.out), args.force, sources=[args.table] if args.table else [], what="--table")
    if args.dataset_dir is not None:
        check_output_folder(Path(args.out), args.force, sources=[args.dataset_dir], what="--dataset-dir")
    if args.method == "sparse":  # the model with its slot table, checked against each other
        model, _, table, _ = load_export_for_tfidf(export, args.table, args.allow_other_run)
        model = model.to(args.device)
    else:
        model, table = load(export, device=args.device), None
    if args.method == "lora":  # before the first evaluation and the adapters
        try:
            check_lora_rank(model, args.lora_rank)
        except ValueError as err:
            raise ValueError(f"--lora-rank {args.lora_rank}: {err}") from None
    tokenizer = Tokenizer(export / "tokenizer.model")
    data = FinetuneSet(args.data, tokenizer, model.cfg.max_seq_len, fmt=args.format, text_field=args.text_field)
    evaluate = None
    masking = trained_with_document_masking(export)
    if (export / "probes.jsonl").is_file():
        evaluate = LearningForgettingEval(
            export, tokenizer, model.cfg.max_seq_len, args.dataset_dir, document_masking=masking
        )
    else:  # no fact probes: learning as the loss on the --data text, forgetting as the validation loss
        evaluate = DataLossEval(data)
        if args.dataset_dir is not None:
            evaluate = combined(evaluate, ValidationLossEval(args.dataset_dir, tokenizer, document_masking=masking))
    return model, table, data, evaluate


def finetune_record(args, table, before: dict, history: list) -> dict:
    """What the new export records of its finetuning: the method, its settings, data and history. Paths are
    absolute: the record is read from the new export's folder, where one relative to the tool's folder
    names nothing."""
    record = {
        "method": args.method,
        "lr": args.lr,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "shuffle": args.shuffle,
        "seed": args.seed,
        "data": [str(Path(p).resolve()) for p in args.data],  # as given (a file, folder or pattern), made absolute
        "before": before,
        "history": history,
    }
    if args.method == "sparse":
        # the table ranked against (--table may name another than the export's, which the new export copies)
        record.update(top_t=args.top_t, max_grad_norm=args.max_grad_norm, table=str(Path(table.path).resolve()))
    if args.method == "lora":
        record["lora_rank"] = args.lora_rank
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from pretrain.data import DataError
    from pretrain.export import ExportError
    from pretrain.slots import TableMismatchError
    from pretrain.smf import build_method, finetune, save_finetuned_export

    try:
        model, table, data, evaluate = load_and_check(args)
    except (ExportError, DataError, TableMismatchError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    steps = -(-len(data) // args.batch_size)
    print(
        f"{data.num_documents} documents in {len(data)} rows of up to {model.cfg.max_seq_len} tokens (a longer "
        f"document is cut into windows), {data.num_tokens} tokens; {steps} steps of up to {args.batch_size} rows "
        f"an epoch; method {args.method}, lr {args.lr}",
        flush=True,
    )
    before = evaluate(model) if evaluate else {}
    if before:
        print("before " + " ".join(f"{k} {v:.4g}" for k, v in before.items()), flush=True)
    method = build_method(
        args.method,
        model,
        lr=args.lr,
        table=table,
        top_t=args.top_t,
        lora_rank=args.lora_rank,
        max_grad_norm=args.max_grad_norm,
    )
    history = finetune(
        method,
        data,
        args.epochs,
        args.batch_size,
        args.shuffle,
        args.seed,
        evaluate,
        log=lambda line: print(line, flush=True),
        eval_every=args.eval_every,
    )
    out = Path(args.out)
    record = finetune_record(args, table, before, history)
    save_finetuned_export(Path(args.export), method.finished_model(), out, record, force=args.force)
    print(f"finetuned export written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
