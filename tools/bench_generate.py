"""Generation throughput: KV-cached vs recomputing decoding, side by side, and an lm-eval run's wall time.

Generates --new-tokens tokens (256) from a --prompt-tokens (64) prompt with the exported
Hugging Face model (`generate()`, greedy) and with `pretrain.export.generation.generate`
(batch 1), cached and uncached, at batch 1 and 8. The model is the tiny config's
(configs/tiny.yaml, random weights: speed does not depend on them) with max_seq_len raised
to fit prompt + new tokens. Modes alternate for --rounds rounds so they share the machine's
load; the median of each is reported with the cached/uncached ratio.

    python tools/bench_generate.py [--rounds 3] [--lm-eval EXPORT_DIR]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pretrain.config import load_config  # noqa: E402
from pretrain.model import Transformer  # noqa: E402


def build_models(config: str, max_seq_len: int, seed: int = 0):
    """(training model, HF model) with the same random weights, fp32, eval mode."""
    from pretrain.hf.configuration_memlayers import MemlayersConfig
    from pretrain.hf.modeling_memlayers import MemlayersForCausalLM

    cfg = load_config(config, [f"model.max_seq_len={max_seq_len}"]).model
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    hf = MemlayersForCausalLM(MemlayersConfig(model=asdict(cfg))).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return model, hf


def time_hf(hf, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return elapsed


def time_pretrain(model, prompt: list[int], new_tokens: int, use_cache: bool) -> float:
    from pretrain.export.generation import generate

    start = time.perf_counter()
    out = generate(model, prompt, new_tokens, use_cache=use_cache)
    elapsed = time.perf_counter() - start
    assert len(out) == new_tokens
    return elapsed


def time_lm_eval(export_dir: Path, probes: int) -> dict:
    """Wall time of memlayers-eval (task writing + lm_eval in a subprocess) on the fact tasks."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(Path(__file__).with_name("memlayers_eval.py")), str(export_dir),
               "--probes", str(probes), "--output", out]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"memlayers-eval failed:\n{proc.stderr[-3000:]}")
        results = json.loads(sorted(Path(out).rglob("results*.json"))[-1].read_text())["results"]
    return {"seconds": elapsed, "probes": probes,
            "exact_match": results["memlayers_facts"]["exact_match,none"], "mc_acc": results["memlayers_facts_mc"]["acc,none"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--lm-eval", metavar="EXPORT_DIR", default=None, help="also time memlayers-eval on an export")
    parser.add_argument("--lm-eval-probes", type=int, default=200)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, hf = build_models(args.config, args.prompt_tokens + args.new_tokens)
    gen = torch.Generator().manual_seed(1)
    vocab = model.cfg.vocab_size
    cases = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompt = torch.randint(4, vocab, (batch, args.prompt_tokens), generator=gen)
        cases.append((f"hf generate() batch {batch}", batch,
                      lambda c, p=prompt: time_hf(hf, p, args.new_tokens, c)))
        if batch == 1:
            cases.append(("pretrain.export generate batch 1", 1,
                          lambda c, p=prompt[0].tolist(): time_pretrain(model, p, args.new_tokens, c)))
    rows = []
    for name, batch, run in cases:
        run(True)  # warm-up
        times = {True: [], False: []}
        for r in range(args.rounds):
            for cached in (True, False):
                times[cached].append(run(cached))
            print(f"[{name}] round {r + 1}/{args.rounds}: cached {times[True][-1]:.2f} s, "
                  f"uncached {times[False][-1]:.2f} s", file=sys.stderr, flush=True)
        cached_s, uncached_s = statistics.median(times[True]), statistics.median(times[False])
        tokens = batch * args.new_tokens
        rows.append({"case": name, "batch": batch, "cached_tok_s": tokens / cached_s,
                     "uncached_tok_s": tokens / uncached_s, "speedup": uncached_s / cached_s})

    print(f"\n{args.new_tokens} new tokens from a {args.prompt_tokens}-token prompt, {args.config} model, "
          f"{torch.get_num_threads()} threads, median of {args.rounds}")
    print(f"{'case':36s} {'cached tok/s':>13s} {'uncached tok/s':>15s} {'speedup':>8s}")
    for row in rows:
        print(f"{row['case']:36s} {row['cached_tok_s']:13.1f} {row['uncached_tok_s']:15.1f} {row['speedup']:7.1f}x")
    report = {"generation": rows}
    if args.lm_eval:
        report["lm_eval"] = time_lm_eval(Path(args.lm_eval), args.lm_eval_probes)
        le = report["lm_eval"]
        print(f"memlayers-eval on {le['probes']} probes: {le['seconds']:.1f} s wall "
              f"(exact_match {le['exact_match']:.3f}, mc acc {le['mc_acc']:.3f})")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
