"""MFU's peak FLOP/s per GPU name (pretrain.metrics.device_peak_flops): whole model names, so
that an 'RTX A1000' is not taken for an A100 (a 312 TFLOP/s peak, an MFU off by far); and
train.peak_flops, which sets it for a GPU not in the table."""

from __future__ import annotations

import pytest
import torch

from pretrain import metrics


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA RTX A1000 Laptop GPU", None),
        ("NVIDIA RTX A1000 6GB", None),
        ("NVIDIA A10", None),
        ("NVIDIA L40", None),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A10G", 70e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H100 SXM5 80GB", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA B200", 2250e12),
        ("NVIDIA GB200", None),  # not a B200: its own clocks
    ],
)
def test_the_peak_is_looked_up_by_whole_model_names(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.device_peak_flops(torch.device("cuda", 0)) == peak


def test_cpu_has_no_peak():
    assert metrics.device_peak_flops(torch.device("cpu")) is None


def test_a_configured_peak_wins_and_an_unknown_gpu_says_how_to_set_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA X1")
    cuda = torch.device("cuda", 0)
    peak, line = metrics.run_peak_flops(cuda, None)
    assert peak is None and "'NVIDIA X1'" in line and "train.peak_flops=" in line
    assert metrics.run_peak_flops(cuda, 5e14) == (5e14, None)
    assert metrics.run_peak_flops(torch.device("cpu"), None) == (None, None)  # CPU: n/a, nothing to set


def test_mfu_is_logged_against_the_configured_peak(tmp_path, data_cache):
    """Even on CPU a configured peak gives MFU: achieved FLOP/s (model FLOPs per token x the
    logged tokens/s) over the peak."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.model.accounting import flops_per_token
    from pretrain.train import train
    from tests.train.helpers import tiny_config

    cfg = tiny_config(tmp_path / "run", data_cache, "train.max_steps=3", "train.log_every=1", "train.peak_flops=1e9")
    train(cfg)
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    tokens_per_s = [e.value for e in board.Scalars("perf/tokens_per_s")]
    utilisation = [e.value for e in board.Scalars("perf/mfu")]
    assert len(utilisation) == 2  # steps 2 and 3: the first step is off the throughput clock
    flops = flops_per_token(cfg.model, cfg.data.seq_len)["total"]
    for u, rate in zip(utilisation, tokens_per_s):
        assert u == pytest.approx(flops * rate / 1e9, rel=1e-6)
