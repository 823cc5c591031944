"""The training objective (cross-entropy, optionally with the z-loss term) on the output logits,
forward+backward, eager against compiled (what train.compile runs), side by side in one process:
time and the peak memory above the logits themselves.

  python tools/bench_objective.py                                   # CUDA: 8 x 2048 tokens, 32K vocabulary, bf16
  python tools/bench_objective.py --batch 1 --seq-len 2048 --vocab 32000 --dtype bf16   # CPU

Eager mode materialises the logits' fp32 copy, its log-softmax and their gradients; compiled,
inductor reads the logits in a few fused passes. Memory is torch.cuda's allocator peak, or the
process's peak resident memory on the CPU (pretrain/peak_memory.py), each from one call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import benchmark as kb  # noqa: E402
from pretrain import peak_memory  # noqa: E402
from pretrain.cli import help_description, non_negative_number, output_file, positive_int  # noqa: E402
from pretrain.files import atomic_write  # noqa: E402
from pretrain.model import training_objective  # noqa: E402
from pretrain.parallel.compile import compile_objective  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=help_description(__doc__))
    p.add_argument("--batch", type=positive_int, default=8 if cuda else 1, help="sequences per batch")
    p.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per sequence")
    p.add_argument("--vocab", type=positive_int, default=32000, help="vocabulary size (logits per token)")
    p.add_argument("--dtype", choices=sorted(kb.DTYPES), default="bf16", help="dtype of the logits")
    p.add_argument(
        "--z-loss",
        type=non_negative_number("0: cross-entropy only"),
        default=0.0,
        help="the z term's weight (optim.z_loss); 0: cross-entropy only",
    )
    p.add_argument("--repeats", type=positive_int, default=20 if cuda else 5, help="timed calls per case")
    p.add_argument(
        "--json",
        type=output_file("bench_objective.json"),
        default=None,
        help="also write the results to this JSON file",
    )
    return p


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    p = build_parser()
    args = p.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, args.seq_len, args.vocab)
    logits = (torch.randn(shape, generator=g, device=device) * 2).to(kb.DTYPES[args.dtype]).requires_grad_()
    targets = torch.randint(0, args.vocab, shape[:2], generator=g, device=device)
    variants = {"eager": training_objective, "compiled": compile_objective(training_objective)}

    def step(objective):
        (grad,) = torch.autograd.grad(objective(logits, targets, args.z_loss).total, logits)
        return grad

    print(f"{kb.device_info(device)['device']}: objective fwd+bwd on {shape} {args.dtype} logits, z_loss {args.z_loss}")
    for objective in variants.values():  # compile, and warm both, before anything is measured
        step(objective)
    rows = []
    for name, objective in variants.items():
        before = peak_memory.start(device.type)
        step(objective)
        extra = max(peak_memory.peak(device.type) - before, 0)
        times, attempts = kb.time_steady(lambda o=objective: kb.time_ms(lambda: step(o), device, args.repeats))
        baseline = rows[0]["p50"] if rows else None
        rows.append(kb.record(name, times, None, None, baseline_ms=baseline, attempts=attempts, peak_extra_bytes=extra))
        print(
            f"  {name:9s} p50 {rows[-1]['p50']:9.3f} ms (p20 {rows[-1]['p20']:.3f}, p80 {rows[-1]['p80']:.3f})"
            f"  peak above the logits {extra / 2**20:9.1f} MiB"
            + (f"  {rows[-1]['speedup']:.2f}x faster than eager" if baseline else ""),
            flush=True,
        )
    eager, compiled = rows
    logits_mib = logits.numel() * logits.element_size() / 2**20
    print(
        f"compiled/eager: time {compiled['p50'] / eager['p50']:.2f}, peak memory "
        f"{compiled['peak_extra_bytes'] / max(eager['peak_extra_bytes'], 1):.2f} (the logits themselves: {logits_mib:.0f} MiB)"
    )
    if args.json:
        payload = {**kb.run_info(device), "settings": vars(args) | {"json": str(args.json)}, "rows": rows}
        atomic_write(args.json, json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
