"""Overhead of slot statistics: training-step time with statistics on vs off.

A step is forward + backward + AdamW update of all parameters (values included), as in
training; `--no-optimizer` times forward + backward only (a stricter denominator).

Measured side by side in one run, alternating on/off steps so that drift hits both
equally, for configs/tiny.yaml's model and for the same model with a 1024^2-slot memory
(`--n-keys 1024`). Prints median and minimum step times and their ratios (the minimum is the
less noisy estimate on a shared machine) (goal: <= 1.05x tiny,
<= 1.02x 1M slots). On the CPU at the document granularity a third setting, `sorted`, counts
with the device path (sorted (slot, unit) pairs) instead of the compiled walk
(kernels/csrc/slot_counts.cpp), alternated with the other two: its ratio to `on` is what the
walk saves. Pure timing: nothing is asserted. `--json PATH` also writes every step's
time (seconds, on and off) beside those numbers, with the device, date, commit and torch version.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from kernels import cpu_ops  # noqa: E402
from kernels.benchmark import write_results  # noqa: E402
from pretrain.cli import int_at_least, output_file, positive_int, torch_device  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.model import Transformer, language_model_loss  # noqa: E402
from pretrain.slots import SlotStatistics, memory_layer_names  # noqa: E402
from pretrain.slots.granularity import parse_granularity  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def bench(
    n_keys: int | None, steps: int, warmup: int, granularity: str, device: str, with_optimizer: bool = True
) -> dict[str, list[float]]:
    """Step times in seconds, {"off": [...], "on": [...]} (and "sorted", see the module
    docstring), `steps` of each, alternating; and the CPU seconds of the steps' `update` calls,
    {"on_update": [...]} (and "sorted_update")."""
    overrides = [f"model.memory.n_keys={n_keys}"] if n_keys else []
    cfg = load_config(REPO / "configs/tiny.yaml", overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model).to(device)
    B, S = cfg.train.micro_batch, cfg.data.seq_len
    names = memory_layer_names(model)
    stats = SlotStatistics(cfg.model.memory.num_slots, names, granularity=granularity, device=device)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=gen).to(device)
    doc_ids = torch.cumsum(torch.rand(B, S, generator=gen) < 0.01, dim=1).add(torch.arange(B)[:, None] * S)
    doc_ids = doc_ids.to(device)
    settings = ["on", "off"]
    if device == "cpu" and parse_granularity(granularity).kind == "document" and cpu_ops.available():
        settings.append("sorted")
    times = {setting: [] for setting in settings}
    times.update({f"{setting}_update": [] for setting in settings if setting != "off"})
    compiled_walk = cpu_ops.count_document_slots_
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4) if with_optimizer else None

    def step(setting: str) -> float:
        on = setting != "off"
        cpu_ops.count_document_slots_ = (lambda *args: False) if setting == "sorted" else compiled_walk
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        if on:
            cpu_start = time.process_time()
            stats.update([m.last_indices for m in model.memory_layers()], doc_ids)
            times[f"{setting}_update"].append(time.process_time() - cpu_start)  # CPU time: robust to load
        if optimizer is not None:
            optimizer.step()
        sync()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    try:
        for i in range(warmup):
            step(settings[i % len(settings)])
        for i in tqdm(range(len(settings) * steps), desc=f"n_keys={cfg.model.memory.n_keys}", leave=False):
            setting = settings[i % len(settings)]
            times[setting].append(step(setting))
    finally:
        cpu_ops.count_document_slots_ = compiled_walk
    return times


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """The median and the minimum step time, off and on, and their ratio on/off; with a
    `sorted` setting also its time and the ratio on/sorted."""
    summary = {}
    for stat, fn in (("median", statistics.median), ("min", min)):
        off, on = fn(times["off"]), fn(times["on"])
        summary[stat] = {"off_s": off, "on_s": on, "ratio": on / off}
        if "sorted" in times:
            sorted_pairs = fn(times["sorted"])
            summary[stat].update(sorted_s=sorted_pairs, sorted_ratio=sorted_pairs / off, on_vs_sorted=on / sorted_pairs)
    return summary


def granularity(text: str) -> str:
    """argparse type of --granularity: a slots.granularity value, checked."""
    try:
        parse_granularity(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=positive_int, default=10, help="timed steps per setting (each on and off)")
    p.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed first steps per setting")
    p.add_argument("--granularity", type=granularity, default="document", help="document, sequence or chunk:<n>")
    p.add_argument(
        "--device",
        type=torch_device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device, e.g. cpu, cuda",
    )
    p.add_argument(
        "--n-keys",
        type=int_at_least(0, "0 = the config's n_keys"),
        nargs="*",
        default=[0, 1024],
        help="0 = the config's n_keys",
    )
    p.add_argument("--no-optimizer", action="store_true", help="time forward + backward only")
    p.add_argument("--json", type=output_file("bench_slots.json"), default=None, help="also write every step time here")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    print(
        f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"granularity {args.granularity}, step = forward + backward"
        f"{'' if args.no_optimizer else ' + AdamW'}"
    )
    print("slots\tstat\toff_ms\ton_ms\tratio\tsorted_ms\tsorted_ratio\ton/sorted")
    rows = []
    for n_keys in args.n_keys:
        times = bench(
            n_keys or None, args.steps, args.warmup, args.granularity, args.device, with_optimizer=not args.no_optimizer
        )
        slots = (n_keys or load_config(REPO / "configs/tiny.yaml").model.memory.n_keys) ** 2
        summary = summarize(times)
        for stat, row in summary.items():
            line = f"{slots}\t{stat}\t{row['off_s'] * 1e3:.1f}\t{row['on_s'] * 1e3:.1f}\t{row['ratio']:.3f}x"
            if "sorted_s" in row:
                line += f"\t{row['sorted_s'] * 1e3:.1f}\t{row['sorted_ratio']:.3f}x\t{row['on_vs_sorted']:.3f}x"
            print(line)
        updates = {k: v for k, v in times.items() if k.endswith("_update")}
        for k, v in updates.items():
            print(
                f"{slots}\t{k} CPU time per call: median {statistics.median(v) * 1e3:.2f} ms, min {min(v) * 1e3:.2f} ms"
            )
        if len(updates) == 2:
            ratio = statistics.median(updates["on_update"]) / statistics.median(updates["sorted_update"])
            print(f"{slots}\tupdate, compiled walk / sorted pairs (medians): {ratio:.3f}x")
        steps_only = {f"{k}_step_s": v for k, v in times.items() if k not in updates}
        rows.append({"slots": slots, **steps_only, **{f"{k}_cpu_s": v for k, v in updates.items()}, **summary})
    if args.json:
        write_results(args.json, args.device, vars(args), threads=torch.get_num_threads(), rows=rows)
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
