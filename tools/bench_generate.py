"""Generation throughput: KV-cached vs recomputing decoding, side by side, and an lm-eval run's wall time.

Generates --new-tokens tokens (256) from a --prompt-tokens (64) prompt with the exported
Hugging Face model (`generate()`, greedy) and with `pretrain.export.generation.generate`
(batch 1), cached and uncached, at batch 1 and 8. The model is the tiny config's
(configs/tiny.yaml, random weights: speed does not depend on them) with max_seq_len raised
to fit prompt + new tokens. Modes alternate for --rounds rounds so they share the machine's
load; the median of each is reported with the cached/uncached ratio, from wall time and from
this process's CPU time (the fairer measure on a shared machine; pair it with --threads 1).

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
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pretrain.cli import int_at_least, output_file, positive_int
from pretrain.config import load_config
from pretrain.files import atomic_write
from pretrain.model import Transformer
from pretrain.words import counted


def build_models(config: str, max_seq_len: int, seed: int = 0):
    """(training model, HF model) with the same random weights, fp32, eval mode."""
    from pretrain.hf.configuration_memlayers import MemlayersConfig
    from pretrain.hf.modeling_memlayers import MemlayersForCausalLM

    cfg = load_config(config, [f"model.max_seq_len={max_seq_len}", f"data.seq_len={max_seq_len}"]).model
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    hf = MemlayersForCausalLM(MemlayersConfig(model=asdict(cfg))).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return model, hf


def timed(fn):
    """(wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def time_hf(hf, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> tuple[float, float]:
    return timed(lambda: _hf_generate(hf, prompt, new_tokens, use_cache))


def _hf_generate(hf, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> None:
    with torch.no_grad():
        out = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            use_cache=use_cache,
            pad_token_id=0,
        )
    assert out.shape[1] == prompt.shape[1] + new_tokens


def time_pretrain(model, prompt: list[int], new_tokens: int, use_cache: bool) -> tuple[float, float]:
    from pretrain.export.generation import generate

    def run():
        assert len(generate(model, prompt, new_tokens, use_cache=use_cache)) == new_tokens

    return timed(run)


def time_lm_eval(export_dir: Path, probes: int) -> dict:
    """Wall time of memlayers-eval (task writing + lm_eval in a subprocess) on the fact tasks."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("memlayers_eval.py")),
            str(export_dir),
            "--probes",
            str(probes),
            "--output",
            out,
        ]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            raise SystemExit(f"memlayers-eval failed:\n{proc.stderr[-3000:]}")
        results = json.loads(max(Path(out).rglob("results*.json")).read_text())["results"]
    return {
        "seconds": elapsed,
        "probes": probes,
        "exact_match": results["memlayers_facts"]["exact_match,none"],
        "mc_acc": results["memlayers_facts_mc"]["acc,none"],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", default="configs/tiny.yaml", help="the run config whose model generates (random weights)"
    )
    parser.add_argument("--prompt-tokens", type=positive_int, default=64, help="tokens in each prompt")
    parser.add_argument("--new-tokens", type=positive_int, default=256, help="tokens generated per prompt")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes to time")
    parser.add_argument("--rounds", type=positive_int, default=3, help="timed rounds per batch size")
    parser.add_argument("--threads", type=int_at_least(0, "0: torch's default"), default=1, help="torch threads")
    parser.add_argument("--lm-eval", metavar="EXPORT_DIR", default=None, help="also time memlayers-eval on an export")
    parser.add_argument(
        "--lm-eval-probes", type=positive_int, default=200, help="fact probes the --lm-eval timing asks"
    )
    parser.add_argument("--json", type=output_file("generate.json"), default=None, help="also write the results here")
    return parser


def parse_args(argv=None) -> tuple[argparse.Namespace, list[int]]:
    """The options and the --batches sizes, refused before any model is built or timed (a bad
    --batches, an --lm-eval export that memlayers-eval would refuse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # refused before any model is built or timed, not after the whole benchmark
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        parser.error(f"--batches {args.batches!r} must be comma-separated integers >= 1, e.g. 1,8")
    if args.lm_eval:  # memlayers-eval refused a missing export or a run directory only after the timings
        from pretrain.data import DataError
        from pretrain.export import ExportError
        from pretrain.export.folders import export_tokenizer_path
        from pretrain.export.loading import export_probes

        try:
            export_tokenizer_path(args.lm_eval)
            export_probes(args.lm_eval)  # the fact tasks ask them
        except (ExportError, DataError) as err:
            parser.error(f"--lm-eval: {err}")
    return args, batches


def time_cases(cases: list, rounds: int, new_tokens: int) -> list[dict]:
    """One row per (name, batch, run) case: run(cached) -> (wall s, CPU s) after a warm-up, `rounds`
    times each way, alternating; the raw seconds and the medians' tokens/s and speedups."""
    rows = []
    for name, batch, run in cases:
        run(True)  # warm-up
        times = {True: [], False: []}
        for r in range(rounds):
            for cached in (True, False):
                times[cached].append(run(cached))
            print(
                f"[{name}] round {r + 1}/{rounds}: cached {times[True][-1][0]:.2f} s, "
                f"uncached {times[False][-1][0]:.2f} s (wall)",
                file=sys.stderr,
                flush=True,
            )
        tokens = batch * new_tokens
        row = {"case": name, "batch": batch, "tokens": tokens}
        for cached in (True, False):  # the raw (wall, CPU) seconds of each round, the medians' samples
            kind = "cached" if cached else "uncached"
            row[f"{kind}_wall_s"] = [t[0] for t in times[cached]]
            row[f"{kind}_cpu_s"] = [t[1] for t in times[cached]]
        for i, clock in enumerate(("wall", "cpu")):
            cached_s = statistics.median(t[i] for t in times[True])
            uncached_s = statistics.median(t[i] for t in times[False])
            row.update(
                {
                    f"cached_tok_s_{clock}": tokens / cached_s,
                    f"uncached_tok_s_{clock}": tokens / uncached_s,
                    f"speedup_{clock}": uncached_s / cached_s,
                }
            )
        rows.append(row)
    return rows


def main(argv=None) -> int:
    args, batches = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, hf = build_models(args.config, args.prompt_tokens + args.new_tokens)
    gen = torch.Generator().manual_seed(1)
    vocab = model.cfg.vocab_size
    cases = []
    for batch in batches:
        prompt = torch.randint(4, vocab, (batch, args.prompt_tokens), generator=gen)
        cases.append((f"hf generate() batch {batch}", batch, partial(time_hf, hf, prompt, args.new_tokens)))
        if batch == 1:
            cases.append(
                (
                    "pretrain.export generate batch 1",
                    1,
                    partial(time_pretrain, model, prompt[0].tolist(), args.new_tokens),
                )
            )
    rows = time_cases(cases, args.rounds, args.new_tokens)
    print(
        f"\n{args.new_tokens} new tokens from a {args.prompt_tokens}-token prompt, {args.config} model, "
        f"{counted(torch.get_num_threads(), 'thread')}, median of {args.rounds}"
    )
    print(f"{'case':34s} {'cached tok/s':>13s} {'uncached tok/s':>15s} {'speedup':>8s}   (wall | CPU time)")
    for row in rows:
        print(
            f"{row['case']:34s} {row['cached_tok_s_wall']:6.0f} | {row['cached_tok_s_cpu']:4.0f} "
            f"{row['uncached_tok_s_wall']:7.0f} | {row['uncached_tok_s_cpu']:5.0f} "
            f"{row['speedup_wall']:5.1f}x | {row['speedup_cpu']:.1f}x"
        )
    from kernels.benchmark import run_info

    report = {
        **run_info(torch.device("cpu")),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "threads": torch.get_num_threads(),
        "generation": rows,
    }
    if args.lm_eval:
        report["lm_eval"] = time_lm_eval(Path(args.lm_eval), args.lm_eval_probes)
        le = report["lm_eval"]
        print(
            f"memlayers-eval on {le['probes']} probes: {le['seconds']:.1f} s wall "
            f"(exact_match {le['exact_match']:.3f}, mc acc {le['mc_acc']:.3f})"
        )
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=2) + "\n")  # its folder made, whole or not at all
    return 0


if __name__ == "__main__":
    sys.exit(main())
