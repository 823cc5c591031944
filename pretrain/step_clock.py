"""Each training step's duration, without making the host wait for the device every step.

On a GPU the host runs ahead of the kernels it queues: when a step's host code returns, the value
optimizer's kernels still run, and the next host read (the stop check) waits for them outside
the step, so the host's time of a step leaves them out. `StepClock` brackets each step with two
CUDA events, recorded and never waited for, and reads them in `settle`, which the trainer calls
where waiting costs nothing extra: at each log (whose throughput then counts all of its interval's
work), before evaluation, checkpoints and slot logs, and at the run's end. On the CPU nothing
runs behind the host: a step's host time is its time.
"""

from __future__ import annotations

import torch


class StepClock:
    """The steps' seconds (`seconds`, in order, complete after `settle`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.seconds: list[float] = []
        self._pending: list = []  # (start, end) events of steps not read yet

    def start(self):
        """Mark a step's start; hand what it returns to `stop`."""
        if not self.cuda:
            return None
        started = torch.cuda.Event(enable_timing=True)
        started.record()
        return started

    def stop(self, started, host_seconds: float) -> None:
        """Mark the step's end, its kernels all queued; `host_seconds`: the host's time of it."""
        if not self.cuda:
            self.seconds.append(host_seconds)
            return
        ended = torch.cuda.Event(enable_timing=True)
        ended.record()
        self._pending.append((started, ended))

    def settle(self) -> list[float]:
        """Wait for the device's queued work; every step's seconds so far."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.seconds.extend(started.elapsed_time(ended) / 1e3 for started, ended in self._pending)
            self._pending.clear()
        return self.seconds
