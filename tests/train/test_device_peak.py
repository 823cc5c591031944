"""MFU's peak FLOP/s per GPU name (pretrain.metrics.device_peak_flops): whole model names, so
that an 'RTX A1000' is not taken for an A100 (a 312 TFLOP/s peak, an MFU off by far)."""

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
    ],
)
def test_the_peak_is_looked_up_by_whole_model_names(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.device_peak_flops(torch.device("cuda", 0)) == peak


def test_cpu_has_no_peak():
    assert metrics.device_peak_flops(torch.device("cpu")) is None
