"""Training throughput, MFU and peak memory: a memory model vs its dense baseline, side by side.

Every variant (model x compile x activation checkpointing) runs the real trainer
(DeepSpeed engine, value pool, slot counters) for a few steps in its own fresh
process, so that each peak memory is its own (CUDA max allocated; peak RSS on CPU)
and no compile cache is shared. Rounds alternate the variants so that all of them
see the same machine load; the report takes medians and prints the ratios of one run:

    python tools/bench_train.py --config configs/tiny.yaml --compile both --ac none,full \
        --steps 10 --rounds 2 --json bench.json --markdown bench.md
    python tools/bench_train.py --config configs/memory_373m.yaml --dtype bf16 --compile on   # GPU

The dense baseline defaults to configs/<name>_dense.yaml (same active parameters).

FLOPs and MFU. `flops_per_token` (pretrain/model/accounting.py) counts training FLOPs
(multiply-add = 2, backward = 2 x forward) of every matmul, attention's QK^T and AV,
and, in a memory layer, the query projection, the half-key scoring (2 H n_keys k_dim),
the bag as H k v_dim multiply-adds, the gate and the output projection; value rows
are read, not multiplied, so the table's size does not count. Reported per variant:
  tflops_counted   counted FLOPs x tokens/s (what the trainer logs as MFU's numerator)
  mfu              tflops_counted / the device's dense bf16 peak
  mfu_dense_equiv  the dense baseline's FLOPs per token x this variant's tokens/s / peak:
                   the MFU a memory model earns for doing its dense twin's work; equal to
                   the baseline's MFU exactly when both train equally fast.
The peak is the trainer's: train.peak_flops when given (an override, for a GPU missing from
pretrain/metrics.py's table), else the device's. CPU runs have no peak (MFU n/a) unless
train.peak_flops is given; the ratios still hold.

A variant that fails (out of memory, say, without activation checkpointing) is a row of its
own with the end of its error, and the others still run; the JSON and markdown are rewritten
after every variant, so a run cut short keeps what it measured. Exit status 1 if any failed.

Each timed run skips its first --warmup steps (compilation happens there) and writes
no checkpoint (the trainer's save is replaced by a no-op in the worker process: a
paper-scale checkpoint would cost minutes of disk, outside the timed steps anyway).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.cli import int_at_least, output_file, output_folder, positive_int  # noqa: E402
from pretrain.files import atomic_write  # noqa: E402
from pretrain.process_tree import kill_child_tree  # noqa: E402
from pretrain.words import counted  # noqa: E402


# ----------------------------------------------------------------------------- worker
def run_worker(spec: dict) -> dict:
    """One variant in this process: train spec['steps'] steps, return times and memory."""

    import torch

    from pretrain.distributed import default_deepspeed_accelerator

    default_deepspeed_accelerator()  # before DeepSpeed is imported
    import pretrain.train as train_module
    from pretrain.config import load_config
    from pretrain.metrics import run_peak_flops
    from pretrain.model import flops_per_token
    from pretrain.model.memory_budget import estimate_memory
    from pretrain.peak_memory import IntervalPeak

    rss_start = IntervalPeak(torch.device("cpu")).read()  # peak RSS so far
    cfg = load_config(
        spec["config"],
        [
            f"train.run_dir={spec['run_dir']}",
            f"train.max_steps={spec['steps']}",
            f"data.cache_dir={spec['data_cache']}",
            f"train.dtype={spec['dtype']}",
            f"train.compile={str(spec['compile']).lower()}",
            f"train.activation_checkpointing={spec['ac']}",
            "train.eval_every=1000000000",
            "train.checkpoint_every=1000000000",
            "train.log_every=1000000000",
            "train.eval_batches=1",
            "train.probe_limit=1",
            *spec["overrides"],
            *([f"optim.value_optimizer={spec['values']}"] if spec.get("values") else []),
        ],
    )
    result = train_module.train(cfg, save_checkpoints=False)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    return {
        "step_times": result.step_times[spec["warmup"] :],
        "tokens_per_step": cfg.train.global_batch * cfg.data.seq_len,
        "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len)["total"],
        # the trainer's MFU peak: train.peak_flops if given (a GPU missing from the table), else the device's
        "peak_flops": run_peak_flops(device, cfg.train.peak_flops)[0],
        "peak_memory_bytes": result.peak_memory_bytes,  # the run's: CUDA max allocated, or peak RSS
        "memory_kind": "cuda_max_allocated" if cuda else "peak_rss",
        # memlayers-model-info's prediction for the same run (pretrain/model/memory_budget.py), beside the
        # measured peak; the compiled objective and blocks save less than the eager ops it counts
        "estimated_memory_bytes": estimate_memory(cfg, world_size=1).total,
        "rss_at_start_bytes": rss_start,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "final_loss": result.losses[-1] if result.losses else None,
        "value_optimizer": cfg.optim.value_optimizer if cfg.model.memory.enabled else None,
    }


# ----------------------------------------------------------------------------- driver
def value_optimizer_choices() -> tuple[str, ...]:
    """optim.value_optimizer's allowed values, read from the config's own type."""
    import typing

    from pretrain.config import OptimConfig

    return typing.get_args(typing.get_type_hints(OptimConfig)["value_optimizer"])


def dense_config_for(config: str) -> str:
    path = Path(config)
    dense = path.with_name(f"{path.stem}_dense{path.suffix}")
    if not dense.is_file():
        raise SystemExit(f"error: no dense baseline {dense} for {config}: pass --dense-config")
    return str(dense)


def variants(args) -> list[dict]:
    """Compiled variants first, and each memory variant beside its dense twin: a run cut short
    (a GPU lease ending) still holds the pairs that the acceptance ratios need. With several
    --value-optimizers the memory variants of the later ones follow the pair."""
    compiles = {"off": [False], "on": [True], "both": [True, False]}[args.compile]
    modes = [m.strip() for m in args.ac.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("none", "full", "memory", "selective")]
    if bad:
        raise SystemExit(f"error: --ac {args.ac}: {bad} not among none, full, memory, selective")
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    if not wanted or any(m not in ("memory", "dense") for m in wanted):
        raise SystemExit(f"error: --models {args.models}: give memory, dense or both (comma-separated)")
    models = {"memory": args.config}
    if "dense" in wanted:
        models["dense"] = args.dense_config or dense_config_for(args.config)
    models = {m: models[m] for m in wanted}
    value_optimizers = [v.strip() for v in args.value_optimizers.split(",") if v.strip()] or [None]
    choices = value_optimizer_choices()
    bad = [v for v in value_optimizers if v not in (None, *choices)]
    if bad:
        raise SystemExit(f"error: --value-optimizers {args.value_optimizers}: {bad} not among {', '.join(choices)}")
    out = []
    for compile_on, mode in itertools.product(compiles, modes):
        # the first memory variant, its dense twin, then the memory variants with the other value
        # optimizers (the dense model has no value pool)
        pairs = [("memory", value_optimizers[0]), ("dense", None), *(("memory", v) for v in value_optimizers[1:])]
        for model, values in pairs:
            if model not in models or (model == "dense" and mode == "memory"):
                continue  # not asked for, or no memory block to checkpoint
            out.append({"model": model, "config": models[model], "compile": compile_on, "ac": mode, "values": values})
    return out


def name_of(v: dict) -> str:
    values = f"/values={v['values']}" if v.get("values") else ""
    return f"{v['model']}/{'compiled' if v['compile'] else 'eager'}/ac={v['ac']}{values}"


def run_variant(v: dict, args, tmp: Path, round_index: int) -> dict:
    spec = dict(
        v,
        steps=args.steps + args.warmup,
        warmup=args.warmup,
        dtype=args.dtype,
        run_dir=str(tmp / f"{name_of(v).replace('/', '-')}-{round_index}"),
        data_cache=str(args.data_cache),
        overrides=args.overrides,
    )
    out_file = tmp / "worker.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--worker-out", str(out_file)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out_file.unlink(missing_ok=True)
    log_file = tmp / "worker.log"
    started = time.monotonic()
    with open(log_file, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        late = wait_for_worker(proc, out_file)
    wall_s = time.monotonic() - started  # start-up, data, compilation and steps: what a GPU stage budgets
    output = log_file.read_text(errors="replace")
    if (proc.returncode != 0 and late is None) or not out_file.is_file():
        lines = [line for line in output.splitlines() if line.strip()]
        return {
            "error": f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}",
            "stderr": output[-4000:],
            "wall_s": wall_s,
        }
    return {**json.loads(out_file.read_text()), "wall_s": wall_s, **({"exit_note": late} if late else {})}


EXIT_GRACE_S = 60.0


def wait_for_worker(proc: subprocess.Popen, out_file: Path, grace_s: float = EXIT_GRACE_S) -> str | None:
    """Wait for the worker to exit; once it has written its result, `grace_s` more at most, then
    SIGKILL to it and its helpers: a hang at exit (torch 2.11's compile-worker sidecar waited
    300 s; a communicator's teardown) would otherwise hold the result until the GPU stage's
    limit ends the driver, and with it every variant still to run. Returns a note when it had to
    kill. Ended by an exception (the stage's SIGTERM is SystemExit here), the worker ends too."""
    written_at = None
    try:
        while True:
            try:
                proc.wait(timeout=1.0)
                return None
            except subprocess.TimeoutExpired:
                if written_at is None and out_file.is_file():
                    written_at = time.monotonic()
                if written_at is not None and time.monotonic() - written_at > grace_s:
                    kill_child_tree(proc)
                    proc.wait()
                    return f"the worker had not exited {grace_s:.0f} s after writing its result: killed"
    except BaseException:
        kill_child_tree(proc)
        proc.wait()
        raise


def end_the_worker_with_the_driver() -> None:
    """SIGTERM (tools/gpu_check.sh's stage time limit, a kill) ends the driver by SystemExit, so
    that `wait_for_worker` kills the variant's worker and waits for it. By default the driver died
    at once and its worker went on: the trainer takes SIGTERM as 'stop after this step', which in
    a compiling first step is a minute away, on the GPU beside the next stage."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def summarise(v: dict, runs: list[dict]) -> dict:
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"variant": name_of(v), **v, "error": failed[0]["error"], "wall_s": sum(r["wall_s"] for r in runs)}
    times = [t for r in runs for t in r["step_times"]]
    first = runs[0]
    median = statistics.median(times)
    tokens_per_s = first["tokens_per_step"] / median
    peak = first["peak_flops"]
    return {
        "variant": name_of(v),
        **v,
        "median_step_s": median,
        "tokens_per_s": tokens_per_s,
        "steps_measured": len(times),
        "tflops_counted": first["flops_per_token"] * tokens_per_s / 1e12,
        "mfu": first["flops_per_token"] * tokens_per_s / peak if peak else None,
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in runs),
        "memory_kind": first["memory_kind"],
        "estimated_memory_bytes": first.get("estimated_memory_bytes"),
        "rss_at_start_bytes": first["rss_at_start_bytes"],
        "flops_per_token": first["flops_per_token"],
        "device": first["device"],
        "peak_flops": peak,
        "value_optimizer": first.get("value_optimizer"),  # as the trainer read it
        "exit_notes": [r["exit_note"] for r in runs if r.get("exit_note")],
        "wall_s": sum(r["wall_s"] for r in runs),  # the worker processes' whole time, start-up included
    }


def add_ratios(rows: list[dict]) -> list[dict]:
    """mfu_dense_equiv per row; memory/dense, compiled/eager and AC/none ratios."""
    rows = [r for r in rows if "error" not in r]
    by_key = {(r["model"], r["compile"], r["ac"], r.get("values")): r for r in rows}
    ratios = []
    for r in rows:
        values = r.get("values")
        tag_values = f", values={values}" if values else ""
        dense = by_key.get(("dense", r["compile"], r["ac"] if r["ac"] != "memory" else "none", None))
        if dense is not None and r["peak_flops"]:
            r["mfu_dense_equiv"] = dense["flops_per_token"] * r["tokens_per_s"] / r["peak_flops"]
        else:
            r["mfu_dense_equiv"] = None
        if r["model"] == "memory" and dense is not None and dense["ac"] == r["ac"]:
            ratios.append(
                {
                    "ratio": f"memory/dense step time ({'compiled' if r['compile'] else 'eager'}, "
                    f"ac={r['ac']}{tag_values})",
                    "value": r["median_step_s"] / dense["median_step_s"],
                }
            )
        eager = by_key.get((r["model"], False, r["ac"], values))
        if r["compile"] and eager is not None:
            ratios.append(
                {
                    "ratio": f"compiled/eager step time ({r['model']}, ac={r['ac']}{tag_values})",
                    "value": r["median_step_s"] / eager["median_step_s"],
                }
            )
        none = by_key.get((r["model"], r["compile"], "none", values))
        if r["ac"] != "none" and none is not None:
            tag = f"({r['model']}, {'compiled' if r['compile'] else 'eager'}, ac={r['ac']}{tag_values} / none)"
            ratios.append({"ratio": f"peak memory {tag}", "value": r["peak_memory_bytes"] / none["peak_memory_bytes"]})
            ratios.append({"ratio": f"step time {tag}", "value": r["median_step_s"] / none["median_step_s"]})
    return ratios


def table(rows: list[dict], ratios: list[dict]) -> str:
    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    lines = [
        "| variant | ms/step | tokens/s | TFLOP/s counted | MFU | MFU dense-equiv | peak memory |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:200].replace('|', '/')} | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['median_step_s'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
            f"{r['tflops_counted']:.3f} | {pct(r['mfu'])} | {pct(r['mfu_dense_equiv'])} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['memory_kind']}) |"
        )
    lines += ["", "| ratio | value |", "|---|---:|"]
    lines += [f"| {q['ratio']} | {q['value']:.3f} |" for q in ratios]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="the memory model's config")
    parser.add_argument("--dense-config", default=None, help="default: configs/<name>_dense.yaml")
    parser.add_argument("--models", default="memory,dense", help="memory, dense or both (comma-separated)")
    parser.add_argument(
        "--value-optimizers",
        default="",
        help="comma-separated optim.value_optimizer values, one memory variant each (default: the config's)",
    )
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="training dtype")
    parser.add_argument(
        "--compile",
        default="off",
        choices=["off", "on", "both"],
        help="torch.compile the model: off, on, or both (one run each)",
    )
    parser.add_argument("--ac", default="none", help="comma-separated train.activation_checkpointing modes")
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int_at_least(0), default=3, help="untimed first steps per run (compilation)")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=2,
        help="rounds of every variant (alternated, so that drifts in the machine's speed spread over all)",
    )
    parser.add_argument(
        "--data-cache",
        type=lambda t: Path(output_folder(t)),  # a file failed every variant, each after its start-up
        default=Path(tempfile.gettempdir()) / "memlayers-bench-data",
        help="folder for the prepared data (data.cache_dir)",
    )
    parser.add_argument(
        "--json",
        type=lambda t: Path(output_file("bench.json")(t)),
        default=None,
        help="write rows, ratios and settings here",
    )
    parser.add_argument(
        "--markdown", type=lambda t: Path(output_file("bench.md")(t)), default=None, help="write the tables here"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every variant")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        atomic_write(args.worker_out, json.dumps(run_worker(json.loads(args.worker))))  # whole or absent
        return 0

    end_the_worker_with_the_driver()
    todo = variants(args)
    runs: dict[str, list[dict]] = {name_of(v): [] for v in todo}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        for round_index in range(args.rounds):
            for i, v in enumerate(todo):
                if any("error" in r for r in runs[name_of(v)]):
                    continue  # failed in an earlier round: it would fail again
                r = run_variant(v, args, Path(tmp), round_index)
                runs[name_of(v)].append(r)
                head = f"round {round_index + 1}/{args.rounds} [{i + 1}/{len(todo)}] {name_of(v)}"
                if "error" in r:
                    print(f"{head}: FAILED {r['error']}\n{r['stderr']}", flush=True)
                else:
                    print(
                        f"{head}: median {statistics.median(r['step_times']) * 1e3:.1f} ms/step, "
                        f"peak {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['wall_s']:.0f} s in all)"
                        + (f"; {r['exit_note']}" if r.get("exit_note") else ""),
                        flush=True,
                    )
                report(args, [summarise(w, runs[name_of(w)]) for w in todo if runs[name_of(w)]], final=False)
    rows = [summarise(v, runs[name_of(v)]) for v in todo]
    print()
    print(report(args, rows, final=True))
    good = [r for r in rows if "error" not in r]
    device = good[0]["device"] if good else "no variant ran"
    print(
        f"\n{device}, dtype {args.dtype}, {counted(args.steps, 'timed step')} x {counted(args.rounds, 'round')}, "
        f"threads: {os.environ.get('OMP_NUM_THREADS', 'default')}"
    )
    return 1 if len(good) < len(rows) else 0


@functools.cache
def provenance() -> dict:
    """The run's UTC start date, the commit and the torch version (kernels.benchmark.run_info; each
    row names its own device)."""
    import torch

    from kernels.benchmark import run_info

    info = run_info(torch.device("cpu"))
    return {key: info[key] for key in ("date", "commit", "torch")}


def report(args, rows: list[dict], final: bool) -> str:
    """The tables of `rows` (the variants measured so far), also written to --json / --markdown."""
    ratios = add_ratios(rows)
    text = table(rows, ratios)
    settings = {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "worker_out")
    }
    if args.json:
        payload = {**provenance(), "rows": rows, "ratios": ratios, "settings": settings, "complete": final}
        atomic_write(args.json, json.dumps(payload, indent=2))
    if args.markdown:
        atomic_write(
            args.markdown, text + ("\n" if final else "\n\n(incomplete: the run is still going or was cut short)\n")
        )
    return text


if __name__ == "__main__":
    sys.exit(main())
