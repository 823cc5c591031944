"""Profile a few training steps: a trace for Perfetto/Chrome/TensorBoard and where the time goes.

`profile_training(cfg, steps)` runs `pretrain.train.train` for `steps` steps under
torch.profiler (CPU, plus CUDA when present; memory on) and writes
`<run_dir>/profile/<host>_<pid>.pt.trace.json` (Chrome trace format: Perfetto and
chrome://tracing open it, and TensorBoard's profiler plugin finds it under
`--logdir <run_dir>/profile`).

Memory-layer regions come from record_function names in the model code:
  memory/scoring        MemoryPlus.search (query projection, product-key top-k, softmax)
  memory/bag_forward    the value-table read (for P > 1 it contains the communication)
  memory/communication  the forward collectives of the partitioned table (P > 1)
  bag backward          autograd nodes named *EmbeddingBagBackward* (reference and Triton), or
                        the custom op memlayers::embedding_bag_backward (kernels/ops.py); not the
                        embedding-bag kernels the PyTorch scoring backward runs for the keys
  scoring backward      the custom op memlayers::pkm_topk_backward (query and half-key gradients)
With a GPU the operators rank by their kernels' time and the report gives the device's busy
share of the steps; the region shares stay host-side intervals (where launches happened).
Shares are of the summed train/forward + train/backward + train/step (+ train/micro_step with
gradient accumulation) regions (named in pretrain/profiler_regions.py); evaluation (its "eval"
region) and checkpointing are left out.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from pretrain import profiler_regions as regions
from pretrain.files import atomic_write

REGIONS = regions.MEMORY_REGIONS
STEP_REGIONS = regions.STEP_REGIONS
EVAL_REGION = regions.EVAL


@dataclass
class ProfileReport:
    trace: Path
    step_time_s: float  # summed train/* regions over the profiled steps
    memory_time_s: dict[str, float]  # scoring, scoring_backward, bag_forward, bag_backward, communication
    top_ops: list[tuple[str, float, int]] = field(default_factory=list)  # (name, self time s, calls)
    # With a GPU: top_ops rank by the kernels' time (self device time: a kernel counts once,
    # under the op that launched it), and device_busy_s sums it over the steps; the rest of
    # step_time_s is the device waiting for the host (launches, syncs, data).
    time_kind: str = "cpu"
    device_busy_s: float | None = None
    # the memory/* regions (REGIONS) recorded at all: a compiled block runs without its
    # record_function regions, so under train.compile scoring and bag_forward have none
    regions_seen: frozenset[str] | None = None
    memory_layers: int | None = None  # the profiled model's (None: not known, a summary of events alone)

    def share(self, part: str) -> float:
        return self.memory_time_s[part] / self.step_time_s if self.step_time_s else 0.0


SCORING_BACKWARD = "memlayers::pkm_topk_backward"  # the custom op (kernels/ops.py)


def _is_bag_backward(name: str) -> bool:
    return (
        "EmbeddingBagBackward" in name
        or name == "memlayers::embedding_bag_backward"  # the custom op
        or (name.startswith("aten::_embedding_bag") and "backward" in name)
    )


def _intervals_total(events) -> float:
    """Total time (s) covered by the union of the events' [start, end) intervals (nested ones count once)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events)
    total, cur_start, cur_end = 0, None, None
    for start, end in spans:
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total / 1e6  # microseconds


def _within(event, spans: list[tuple[int, int]]) -> bool:
    start = event.time_range.start
    return any(lo <= start < hi for lo, hi in spans)


def summarize(events, trace: Path, top: int = 15, skip_steps: int = 0) -> ProfileReport:
    """Attribute the events of the training steps (evaluation excluded) to operators and memory
    regions; events before the end of the first `skip_steps` optimizer steps (compilation,
    autotuning, allocator warm-up) are left out."""
    if skip_steps:
        ends = sorted(e.time_range.end for e in events if e.name == regions.STEP)
        if len(ends) <= skip_steps:
            raise ValueError(f"skip_steps={skip_steps} leaves none of the {len(ends)} profiled steps")
        events = [e for e in events if e.time_range.start >= ends[skip_steps - 1]]
    evals = [(e.time_range.start, e.time_range.end) for e in events if e.name == EVAL_REGION]
    steps = [e for e in events if e.name in STEP_REGIONS and not _within(e, evals)]
    spans = [(e.time_range.start, e.time_range.end) for e in steps]
    inside = [e for e in events if _within(e, spans) and not _within(e, evals)]
    by_name: dict[str, list] = {}
    for e in inside:
        by_name.setdefault(e.name, []).append(e)
    memory = {part: _intervals_total(by_name.get(region, [])) for part, region in REGIONS.items()}
    # the PyTorch scoring backward computes the half-key gradients with aten's embedding-bag
    # kernels: those are the scoring's, not the value bag's
    scoring_backward = by_name.get(SCORING_BACKWARD, [])
    scoring_spans = [(e.time_range.start, e.time_range.end) for e in scoring_backward]
    memory["scoring_backward"] = _intervals_total(scoring_backward)
    memory["bag_backward"] = _intervals_total(
        [e for e in inside if _is_bag_backward(e.name) and not _within(e, scoring_spans)]
    )
    device = any(_self_device_us(e) > 0 for e in inside)
    ops: dict[str, list[float]] = {}
    for e in inside:
        if e.name.startswith(("train/", "memory/")):
            continue
        entry = ops.setdefault(e.name, [0.0, 0])
        entry[0] += (_self_device_us(e) if device else e.self_cpu_time_total) / 1e6
        entry[1] += 1
    top_ops = sorted(((n, t, c) for n, (t, c) in ops.items()), key=lambda r: -r[1])[:top]
    busy = sum(_self_device_us(e) for e in inside) / 1e6 if device else None
    seen = frozenset(part for part, region in REGIONS.items() if by_name.get(region))
    return ProfileReport(trace, _intervals_total(steps), memory, top_ops, "device" if device else "cpu", busy, seen)


def _self_device_us(event) -> float:
    """The event's own kernels' time (µs)."""
    return event.self_device_time_total


def profile_training(cfg, steps: int = 3, trace_dir: str | Path | None = None, skip_steps: int = 0) -> ProfileReport:
    """Train `steps` steps of `cfg` (from scratch, in cfg.train.run_dir) under the profiler; the
    summary leaves out the first `skip_steps` (the trace holds them all)."""
    import pretrain.train as train_module

    if steps <= 0 or not 0 <= skip_steps < steps:
        raise ValueError(f"steps={steps} must be positive and skip_steps={skip_steps} in [0, steps)")
    cfg.train.max_steps = steps
    cfg.train.eval_every = max(cfg.train.eval_every, steps + 1)
    # the closing evaluation is left out of the summary: one batch keeps it short. No fact probe:
    # one probe's recall (0 or 1) and chance (1/16 for a profession question) said nothing, and
    # differed from the demo's chance, the mean over train.probe_limit probes
    cfg.train.eval_batches, cfg.train.probe_limit = 1, 0
    run_dir = Path(cfg.train.run_dir)
    if (run_dir / "checkpoints" / "latest").exists():
        raise ValueError(
            f"train.run_dir={run_dir} holds checkpoints (a run would resume): profile into a new "
            "run_dir, e.g. train.run_dir=runs/profile"
        )
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True, record_shapes=False) as prof:
        train_module.train(cfg, save_checkpoints=False)  # nothing to resume; 373M's would be ~18 GB
    trace_dir = Path(trace_dir) if trace_dir else run_dir / "profile"
    trace_dir.mkdir(parents=True, exist_ok=True)
    trace = trace_dir / f"{socket.gethostname()}_{os.getpid()}.pt.trace.json"
    atomic_write(trace, lambda tmp: prof.export_chrome_trace(str(tmp)))
    report = summarize(prof.events(), trace, skip_steps=skip_steps)
    return replace(report, memory_layers=len(cfg.model.memory.layers))


def format_report(report: ProfileReport) -> str:
    self_time = "self s" if report.time_kind == "cpu" else "kernel s"
    lines = [f"trace: {report.trace}", "", f"{'operator':<60} {self_time:>9} {'calls':>7}"]
    lines += [f"{name[:60]:<60} {t:>9.4f} {c:>7}" for name, t, c in report.top_ops]
    if report.device_busy_s is not None and report.step_time_s:
        lines += [
            "",
            f"device busy {report.device_busy_s:.3f} s of the steps' {report.step_time_s:.3f} s "
            f"({100 * report.device_busy_s / report.step_time_s:.1f}%; the rest it waited for the host)",
        ]
    if report.memory_layers == 0:  # a dense baseline: its rows all read "not seen", as if compiled
        lines += [
            "",
            f"memory layers: none in this model (model.memory.layers is empty); {report.step_time_s:.3f} s in "
            "train/forward+backward+step",
        ]
        return "\n".join(lines)
    lines += ["", f"memory layers, share of the step time ({report.step_time_s:.3f} s in train/forward+backward+step):"]
    # P = 1 has no communication region, and none is due: it stays 0 s
    unseen = (
        [] if report.regions_seen is None else [p for p in ("scoring", "bag_forward") if p not in report.regions_seen]
    )
    for part in ("scoring", "scoring_backward", "bag_forward", "bag_backward", "communication"):
        if part in unseen:
            lines.append(f"  {part:<16} {'not seen':>11}")
        else:
            lines.append(f"  {part:<16} {report.memory_time_s[part]:>9.4f} s  {100 * report.share(part):6.2f}%")
    lines.append("  (communication is nested inside bag_forward when memory.parallel_size > 1)")
    if unseen:
        lines.append(
            "  not seen: no such region was recorded, which is not 0 s: a compiled block (train.compile) "
            "runs without its record_function regions; its kernels are among the operators above"
        )
    return "\n".join(lines)
