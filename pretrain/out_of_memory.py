"""What a rank that runs out of memory is told: where, how much was in use, which checkpoint is
intact, and the settings of this run that lower the memory per rank.

`explain_out_of_memory(cfg, info, watchdog, memory)` wraps a run: torch's out-of-memory error (CUDA's
`torch.OutOfMemoryError`, or the CPU allocator's "can't allocate memory") leaves it as
`OutOfMemory`, whose message the CLI prints before exiting with status 2. Nothing is saved on
the way out: a step cut short by an allocation is no state to keep, and the latest checkpoint
is complete (checkpoints are written under a temporary name and renamed). Each setting named is
valid for this run (the global batch and the world size stay), so it can be pasted as an override.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

GiB = 2**30


class OutOfMemory(RuntimeError):
    """A rank ran out of memory; the message names where and the settings that lower it."""


def remedies(cfg, world_size: int) -> list[str]:
    """Overrides that lower this run's memory per rank, most effective first for activations."""
    t, memory = cfg.train, cfg.model.memory
    out = []
    sample = _sample_bytes(cfg)
    if sample >= GiB:  # its buffers come at the first step, all at once: slots.sample_batches=10**12 asked 8 TB
        out.append(_no_sample(cfg, sample))
    smaller = [m for m in range(t.micro_batch - 1, 0, -1) if t.global_batch % (m * world_size) == 0]
    if smaller:
        m = smaller[0]
        out.append(
            f"train.micro_batch={m} (now {t.micro_batch}; the global batch {t.global_batch} stays, "
            f"through {t.global_batch // (m * world_size)} micro-batches per step and rank)"
        )
    if t.activation_checkpointing != "full":
        out.append(
            f"train.activation_checkpointing=full (now {t.activation_checkpointing}; each block's "
            "activations are recomputed in the backward instead of kept)"
        )
    if world_size > 1 and t.zero_stage < 3:
        what = {0: "the optimizer states", 1: "the gradients too", 2: "the weights too"}[t.zero_stage]
        resume = "" if t.zero_stage == 1 else "; in a new run: a resume switches only between stages 1 and 2"
        out.append(f"train.zero_stage={t.zero_stage + 1} (shards {what} over the {world_size} ranks{resume})")
    if memory.layers:
        value_dim = cfg.model.value_dim
        larger = [
            p for p in range(memory.parallel_size + 1, world_size + 1) if world_size % p == 0 and value_dim % p == 0
        ]
        if larger:
            out.append(
                f"model.memory.parallel_size={larger[0]} (now {memory.parallel_size}; each rank holds "
                f"1/{larger[0]} of the value pool's columns and their optimizer state)"
            )
    if 0 < sample < GiB:
        out.append(_no_sample(cfg, sample))
    return out


def _sample_bytes(cfg) -> int:
    """Host memory of the background sample of slot indices (pretrain/slots/sample.py): for each of
    slots.sample_batches micro-batches, int32 indices of each memory layer's heads x k per token and an
    int64 document id per token."""
    memory, s = cfg.model.memory, cfg.slots
    if not (s.enabled and s.sample_batches > 0 and memory.layers):
        return 0
    tokens = cfg.train.micro_batch * cfg.data.seq_len
    return s.sample_batches * tokens * (len(memory.layers) * memory.heads * memory.k * 4 + 8)


def _no_sample(cfg, sample: int) -> str:
    size = f"{sample / GiB:,.1f} GiB" if sample >= GiB else f"{sample / 2**20:,.1f} MiB"
    return (
        f"slots.sample_batches=0 (now {cfg.slots.sample_batches}; its background sample of slot indices "
        f"holds about {size} of host memory)"
    )


def memory_in_use(device: torch.device, memory=None) -> str:
    """How much memory this process held: torch's CUDA allocator, or the process's peak RSS. The
    peak is over `memory`'s interval (a `pretrain.peak_memory.IntervalPeak`: since the last log,
    whose reset restarts the counter) and its run's, else since the process started."""
    from pretrain.peak_memory import IntervalPeak

    memory = memory if memory is not None else IntervalPeak(device)
    interval = memory.read()
    over_run = memory.run_peak if memory.since != "the process started" else None
    run = f", {over_run / GiB:.2f} GiB over the run" if over_run is not None else ""
    peak = f"{interval / GiB:.2f} GiB since {memory.since}{run}"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (
            f"{torch.cuda.memory_allocated(device) / GiB:.2f} GiB allocated by torch (peak {peak}; "
            f"{torch.cuda.memory_reserved(device) / GiB:.2f} GiB reserved), {free / GiB:.2f} GiB free "
            f"of {total / GiB:.2f} GiB on {torch.cuda.get_device_name(device)}"
        )
    total = _meminfo_total()
    of = f" ({total / GiB:.2f} GiB in this machine)" if total else ""
    return f"peak resident memory {peak}{of}"


def _meminfo_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "can't allocate memory" in str(err)
    )


def describe(cfg, info, where: str, err: BaseException, memory=None) -> str:
    from pretrain.checkpoint import CheckpointError, latest_checkpoint

    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    try:
        latest = latest_checkpoint(Path(cfg.train.run_dir) / "checkpoints")
    except CheckpointError:
        latest = None
    kept = f"the run resumes from {latest} (complete)" if latest is not None else "the run has no checkpoint yet"
    fixes = remedies(cfg, info.world_size)
    advice = (
        "lower the memory per rank with one of: " + "; ".join(fixes)
        if fixes
        else "this run has no setting left that lowers it: use devices with more memory, more ranks, or a smaller model"
    )
    return (
        f"rank {info.rank} ran out of {info.device.type} memory {where}: {first_line}. In use: "
        f"{memory_in_use(info.device, memory)}. Nothing was saved on the way out: {kept}. To fit, {advice}"
    )


@contextlib.contextmanager
def explain_out_of_memory(cfg, info, watchdog, memory=None):
    """Turn an out-of-memory error inside into `OutOfMemory`, placed by the watchdog's last
    progress (the step, evaluation or checkpoint the rank finished last); `memory`: the run's
    `IntervalPeak`, whose interval the quoted peak is over."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        last = watchdog.last_progress
        where = (
            f"after {last}"
            if last
            else "before this run's first step finished (start-up, resume, compilation or that step)"
        )
        raise OutOfMemory(describe(cfg, info, where, err, memory)) from None
