"""The peak memory of a stretch of code, for benchmarks: `start(device)` before it, `peak(device)`
after; the difference is what the stretch itself allocated at its high point. `IntervalPeak`: the
trainer's peak per log interval and over the run.

On the CPU the numbers are the kernel's (Linux /proc/self/status: VmRSS, and VmHWM, the
high-water mark, reset through /proc/self/clear_refs), after the C heap's free pages were
returned with malloc_trim so that memory reused from an earlier stretch still counts. On
CUDA they are torch's allocator statistics.
"""

from __future__ import annotations

import ctypes

import torch


def memory_status() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the kernel (glibc malloc_trim), so that memory a
    previous step freed but the allocator kept does not hide this step's temporaries from
    the RSS high-water mark."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then undercount reused memory
        pass


def start(device: str) -> int:
    """Reset the peak counter; return the memory in use now (process RSS, or CUDA allocated)."""
    if device == "cpu":
        release_free_heap()
        before = memory_status()["VmRSS"]
        reset_peak()
        return before
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def peak(device: str) -> int:
    """The high point since `start` (process peak RSS, or CUDA max allocated)."""
    if device == "cpu":
        return memory_status()["VmHWM"]
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def _cpu_peak() -> int:
    """This process's peak RSS since it started or since the last `reset_peak`."""
    try:
        return memory_status()["VmHWM"]
    except (OSError, KeyError):  # no /proc (not Linux): getrusage's peak, in KiB on Linux-likes
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class IntervalPeak:
    """The peak memory of each interval (the trainer's log intervals: `read`, then `reset`) and
    of the whole run (`run_peak`, the largest read). CUDA: torch's max allocated; CPU: the
    process's peak RSS. `since` says where the current interval began ("the log at step 40"):
    where the CPU peak cannot be reset (no /proc/self/clear_refs), it stays "the process started".

    Resetting the CPU peak also resets getrusage's ru_maxrss (one counter in the kernel)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.since = "the process started"
        self.run_peak = 0

    def read(self) -> int:
        """The peak since `since`, in bytes (also kept in `run_peak`)."""
        if self.device.type == "cuda":
            value = torch.cuda.max_memory_allocated(self.device)
        else:
            value = _cpu_peak()
        self.run_peak = max(self.run_peak, value)
        return value

    def reset(self, since: str) -> None:
        """Start a new interval, `since` naming its start; the peak so far goes into `run_peak`."""
        self.read()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                reset_peak()
            except OSError:  # not resettable here: the peak stays the process's
                return
        self.since = since
