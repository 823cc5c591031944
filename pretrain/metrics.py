"""Training metrics: TensorBoard scalars (rank 0), console progress lines, MFU.

MFU = achieved model FLOP/s / the device's peak dense bf16 FLOP/s (no sparsity
figures), from `PEAK_BF16_FLOPS`; unknown devices and CPUs report n/a.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import torch

from pretrain.files import flush_to_disk

# Dense (not 2:4 sparse) bf16 tensor-core peaks, FLOP/s.
PEAK_BF16_FLOPS = {
    "B200": 2250e12,
    "H200": 989e12,
    "H200 NVL": 835e12,  # the PCIe card: lower clocks and power than the SXM H200
    "H100 SXM": 989e12,
    "H100 80GB HBM3": 989e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "GH200": 989e12,  # its GPU is a Hopper H100's
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def run_peak_flops(device: torch.device, configured: float | None) -> tuple[float | None, str | None]:
    """MFU's peak for a run: `configured` (train.peak_flops) if set, else the device's; with a
    line to log when a GPU's peak is unknown, saying how to set it."""
    if configured is not None:
        return configured, None
    peak = device_peak_flops(device)
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return None, (
            f"MFU n/a: no dense bf16 peak is known for {name!r}; set train.peak_flops=<its FLOP/s> "
            "(e.g. 2.25e15 for a B200) to log MFU"
        )
    return peak, None


def peak_flops_of(name: str) -> float | None:
    """The peak of the GPU named `name` (e.g. 'NVIDIA H100 80GB HBM3'): the longest
    PEAK_BF16_FLOPS key whose every word is a whole word of the name (split at spaces, '-' and
    '_'; case ignored), so that 'A100' is not 'NVIDIA RTX A1000' nor 'H200' 'GH200'. A word of
    letters alone also matches it followed by digits ('SXM': 'SXM5')."""
    words = re.split(r"[\s_-]+", name.upper())

    def has(part: str) -> bool:
        part = part.upper()
        return any(w == part or (part.isalpha() and w.startswith(part) and w[len(part) :].isdigit()) for w in words)

    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if all(has(part) for part in key.split()):
            return PEAK_BF16_FLOPS[key]
    return None


def quiet_tensorboard_write_failures() -> None:
    """TensorBoard's writer thread, its write refused (a full disk), prints its own traceback
    (threading.excepthook, "Exception in thread ...") beside `MetricsLogger`'s one message: read as
    a crash. It keeps the error and raises it at the writer's next call, where `MetricsLogger._write`
    says it; so the excepthook leaves out that thread's OSError, and only that (any other thread's
    error, or another error of that thread, is printed as before). Once per process."""
    try:
        from tensorboard.summary.writer.event_file_writer import _AsyncWriterThread
    except ImportError:  # another TensorBoard: its traceback is printed
        return
    printing = threading.excepthook
    if getattr(printing, "quiets_tensorboard_write_failures", False):
        return

    def hook(args) -> None:
        if isinstance(args.thread, _AsyncWriterThread) and isinstance(args.exc_value, OSError):
            return
        printing(args)

    hook.quiets_tensorboard_write_failures = True
    threading.excepthook = hook


class MetricsLogger:
    """Writes scalars to TensorBoard and prints a one-line summary; only on rank 0."""

    def __init__(self, log_dir: str | Path, enabled: bool):
        self.enabled, self.log_dir = enabled, Path(log_dir)
        self.writer = None  # opened at the first scalar, after `resumed_at`
        self.purge_step: int | None = None
        self.failed: OSError | None = None  # TensorBoard's write failed: it logs nothing more
        self.start = time.time()

    def resumed_at(self, step: int) -> None:
        """The run continues from a checkpoint of step `step`: TensorBoard is to hide what an earlier
        run logged after it (steps past a rollback, or past the last checkpoint before a crash or
        preemption), which the resumed run logs again. Call before the first scalar."""
        if self.writer is not None:
            raise RuntimeError("MetricsLogger.resumed_at must come before the first scalar")
        self.purge_step = step + 1  # step `step` itself (its loss, evaluation) is the checkpoint's

    def _writer(self):
        if self.writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            quiet_tensorboard_write_failures()
            # purge_step: a SessionLog START at that step, after which TensorBoard drops the events
            # of this log directory at that step and later that were written before it
            self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self.writer

    def _write(self, action) -> None:
        """action(writer), where TensorBoard logs. A write the filesystem refuses (a full disk, a
        quota; TensorBoard's writer thread raises it at the next call) stops TensorBoard for the
        rest of the run, said once, and the run goes on: raised, it ended rank 0 alone in the
        middle of a step while the other ranks waited for it until the hang watchdog fired."""
        if not self.enabled or self.failed is not None:
            return
        try:
            action(self._writer())
        except OSError as err:
            self.failed = err
            self.line(
                f"warning: TensorBoard cannot write {self.log_dir} ({err}): it logs nothing more in this run; "
                "training goes on (a checkpoint write on a full disk stops every rank, naming the fix)"
            )
            self._close_quietly()

    def scalars(self, values: dict[str, float], step: int) -> None:
        def add(writer) -> None:
            for key, value in values.items():
                if value is not None:
                    writer.add_scalar(key, value, step)

        self._write(add)

    def histogram(self, tag: str, values: torch.Tensor, step: int) -> None:
        self._write(lambda writer: writer.add_histogram(tag, values, step))

    def line(self, text: str) -> None:
        if self.enabled:
            elapsed = time.time() - self.start
            print(f"[{elapsed:7.1f}s] {text}", flush=True)

    def flush_to_disk(self) -> None:
        """The events logged so far onto the disk; called before a checkpoint is written. After a
        power cut the run resumes from the checkpoint and TensorBoard's log (which hides what was
        logged past it, `resumed_at`) must hold every step up to it: the page cache that a crashed
        node loses held the last ~30 s of events, while the checkpoint was flushed, a gap in the
        log that no resume fills."""
        if self.writer is not None:
            self._write(lambda writer: (writer.flush(), flush_to_disk(self.log_dir)))

    def close(self) -> None:
        if self.writer is not None:
            self._write(lambda writer: writer.flush())
            self._close_quietly()

    def _close_quietly(self) -> None:
        writer, self.writer = self.writer, None
        try:
            if writer is not None:
                writer.close()
        except OSError:  # its failure is said already (or, at close, by the flush before)
            pass


def mfu(flops_per_token: float, tokens_per_second: float, world_size: int, peak: float | None) -> float | None:
    if peak is None:
        return None
    return flops_per_token * tokens_per_second / (peak * world_size)
