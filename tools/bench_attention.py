"""Attention with document masking: SDPA causal (no masking, the floor), SDPA with the dense
document mask, and FlexAttention with the block mask (model.document_attention), timed side by
side at several mean document lengths, forward+backward on CUDA (forward only on CPU, where
FlexAttention has no backward):

  python tools/bench_attention.py --json attention.json                     # CUDA: 8 x 2048, 16 heads
  python tools/bench_attention.py --batch 2 --seq-len 256 --heads 4 --doc-lengths 32,128   # CPU

Documents have exponentially distributed lengths of the given mean (at least 1 token), packed
back to back as the data pipeline packs them. Each row reports p20/p50/p80 milliseconds, the
share of the causal score matrix the documents keep (what a perfect block-skipping kernel
would compute), and the speed-up over the dense mask. The block mask is built once per row
(as the trainer builds it once per batch) and its build time reported apart: one call's wall
time, the device idle when the clock starts (the ids' copy and the dense mask queued before it
are not counted in) and its kernels finished when it stops (`kernels.benchmark.time_once_ms`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels import benchmark as kb  # noqa: E402
from pretrain.cli import help_description, int_at_least, output_file, positive_int  # noqa: E402
from pretrain.files import atomic_write  # noqa: E402
from pretrain.model.document_attention import (  # noqa: E402
    document_block_mask,
    document_causal_mask,
    flex_document_attention,
)


def packed_doc_ids(batch: int, seq_len: int, mean_length: float, seed: int = 0) -> torch.Tensor:
    """(batch, seq_len) document ids of exponentially distributed lengths, packed back to back."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        ids, doc = [], 0
        while len(ids) < seq_len:
            length = max(1, int(torch.empty(1).exponential_(1 / mean_length, generator=g)))
            ids.extend([doc] * length)
            doc += 1
        rows.append(ids[:seq_len])
    return torch.tensor(rows)


def kept_fraction(doc_ids: torch.Tensor) -> float:
    """Entries of the document mask over entries of the causal mask."""
    S = doc_ids.shape[1]
    return document_causal_mask(doc_ids).sum().item() / (doc_ids.shape[0] * S * (S + 1) / 2)


def doc_lengths(text: str) -> list[float]:
    """argparse type of --doc-lengths: comma-separated mean document lengths, each >= 1 token."""
    try:
        lengths = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 128,512,2048") from None
    if not all(1 <= x < float("inf") for x in lengths):
        raise argparse.ArgumentTypeError(f"{text!r}: each mean document length must be a number >= 1 (tokens)")
    return lengths


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=help_description(__doc__))
    p.add_argument("--batch", type=positive_int, default=8 if cuda else 2, help="sequences per batch")
    p.add_argument("--seq-len", type=positive_int, default=2048 if cuda else 256, help="tokens per sequence")
    p.add_argument("--heads", type=positive_int, default=16 if cuda else 4, help="query heads")
    p.add_argument(
        "--kv-heads",
        type=int_at_least(0, "0 = as --heads"),
        default=0,
        help="0: as --heads (no grouped-query attention)",
    )
    p.add_argument("--head-dim", type=positive_int, default=64, help="dimension of each head")
    p.add_argument(
        "--doc-lengths",
        type=doc_lengths,
        default="128,512,2048" if cuda else "32,128",
        help="mean document lengths, comma-separated",
    )
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32", help="dtype of q, k and v")
    p.add_argument("--repeats", type=positive_int, default=20 if cuda else 3, help="timed calls per case")
    p.add_argument(
        "--json",
        type=output_file("bench_attention.json"),
        default=None,
        help="also write the results to this JSON file",
    )
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The options (CUDA's defaults are larger), --kv-heads refused unless it divides --heads."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.kv_heads and args.heads % args.kv_heads:
        p.error(f"--kv-heads {args.kv_heads} must divide --heads {args.heads} (grouped-query attention)")
    return args


class StreamedRows(list):
    """Each row printed as it is measured and the JSON (`info`, the settings and the rows so far)
    rewritten atomically after it, so a run cut short (the gpu_check stage's time limit) keeps what
    it measured."""

    def __init__(self, args: argparse.Namespace, info: dict):
        super().__init__()
        self.args, self.info = args, info

    def append(self, r: dict) -> None:
        super().append(r)
        doc = f"{r['mean_doc_length']:.0f}" if r["mean_doc_length"] else "-"
        kept = f"{100 * r['kept_fraction']:.0f}%" if "kept_fraction" in r else "100%"
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else ""
        print(
            f"{r['name']:26} {doc:>9} {kept:>6} {r['p20']:9.3f} {r['p50']:9.3f} {r['p80']:9.3f} {speedup:>9}",
            flush=True,
        )
        if self.args.json:
            payload = {**self.info, "settings": vars(self.args) | {"json": str(self.args.json)}, "rows": list(self)}
            atomic_write(self.args.json, json.dumps(payload, indent=2))


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    kv_heads = args.kv_heads or args.heads
    gqa = kv_heads != args.heads
    backward = cuda  # FlexAttention has no backward on CPU

    g = torch.Generator(device=device).manual_seed(0)

    def tensor(heads):
        shape = (args.batch, heads, args.seq_len, args.head_dim)
        return torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_(backward)

    q, k, v = tensor(args.heads), tensor(kv_heads), tensor(kv_heads)
    grad = torch.randn_like(q)

    def run(attend):
        def step():
            out = attend()
            if backward:
                torch.autograd.grad(out, (q, k, v), grad)

        with torch.set_grad_enabled(backward):
            return kb.time_steady(lambda: kb.time_ms(step, device, args.repeats))

    what = "forward+backward" if backward else "forward (no FlexAttention backward on CPU)"
    print(
        f"{kb.device_info(device)['device']}: {what}, B={args.batch} S={args.seq_len} heads={args.heads}/{kv_heads} "
        f"d={args.head_dim} {args.dtype}"
    )
    print(
        f"{'row':26} {'mean doc':>9} {'kept':>6} {'p20 ms':>9} {'p50 ms':>9} {'p80 ms':>9} {'vs dense':>9}", flush=True
    )
    rows = StreamedRows(args, kb.run_info(device))
    causal, attempts = run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa))
    rows.append(kb.record("sdpa_causal", causal, None, None, attempts=attempts, mean_doc_length=None))
    for mean_length in args.doc_lengths:
        doc_ids = packed_doc_ids(args.batch, args.seq_len, mean_length).to(device)
        dense_mask = document_causal_mask(doc_ids)
        # the dense mask's kernels and the ids' copy are still queued: not the block mask's time
        block_mask, build_ms = kb.time_once_ms(lambda ids=doc_ids: document_block_mask(ids), device)
        dense, attempts_dense = run(
            lambda m=dense_mask: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=gqa)
        )
        flex, attempts_flex = run(lambda m=block_mask: flex_document_attention(q, k, v, m, enable_gqa=gqa))
        kept = kept_fraction(doc_ids.cpu())
        common = {"mean_doc_length": mean_length, "kept_fraction": kept}
        rows.append(kb.record("sdpa_dense_document_mask", dense, None, None, attempts=attempts_dense, **common))
        dense_p50 = rows[-1]["p50"]
        rows.append(
            kb.record(
                "flex_block_mask",
                flex,
                None,
                None,
                baseline_ms=dense_p50,
                attempts=attempts_flex,
                block_mask_build_ms=build_ms,
                **common,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
