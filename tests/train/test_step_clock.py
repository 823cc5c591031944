"""StepClock: step times from CUDA events read at log intervals, no host wait per step (faked
CUDA events and synchronize on the CPU, in a real training run)."""

from __future__ import annotations

import torch

import pretrain.trainer as trainer_module
from pretrain.step_clock import StepClock
from pretrain.train import train
from tests.train.helpers import tiny_config


class FakeDevice:
    """A device timeline where each recorded event lands 250 ms after the previous one, and an
    event's time can be read only after a synchronize that followed its record (as on CUDA)."""

    def __init__(self):
        self.now_ms, self.synced_at, self.stops, self.syncs_after_step = 0.0, 0.0, 0, []

    def event(self, enable_timing=False):
        device = self

        class Event:
            def record(self, stream=None):
                device.now_ms += 250.0
                self.ms = device.now_ms

            def elapsed_time(self, end):
                assert end.ms <= device.synced_at, "an event read before the device finished it"
                return end.ms - self.ms

        return Event()

    def synchronize(self, device=None):
        self.synced_at = self.now_ms
        self.syncs_after_step.append(self.stops)


class CountingClock(StepClock):
    def __init__(self, device):
        super().__init__(device)
        self.cuda = True  # the GPU path, on the fake device

    def stop(self, started, host_seconds):
        super().stop(started, host_seconds)
        FAKE.stops += 1


FAKE = FakeDevice()


def test_step_times_come_from_events_read_only_at_log_and_periodic_work(tmp_path, data_cache, monkeypatch):
    """4 steps, a log every 2, slot logs every 2, the evaluation and checkpoint at the last: the
    device is waited for after the first step (its time is logged apart), at steps 2 and 4 and at
    the end, never after step 3; each step's time is its events' 250 ms, not the host's."""
    FAKE.__init__()
    monkeypatch.setattr(torch.cuda, "Event", FAKE.event)
    monkeypatch.setattr(torch.cuda, "synchronize", FAKE.synchronize)
    monkeypatch.setattr(trainer_module, "StepClock", CountingClock)
    result = train(tiny_config(tmp_path / "run", data_cache, "train.max_steps=4", "train.log_every=2"))
    assert result.step_times == [0.25] * 4
    assert set(FAKE.syncs_after_step) == {1, 2, 4}


def test_on_the_cpu_a_step_is_its_host_time():
    clock = StepClock(torch.device("cpu"))
    clock.stop(clock.start(), 1.5)
    clock.stop(clock.start(), 0.5)
    assert clock.settle() == [1.5, 0.5] and clock.settle() == [1.5, 0.5]
