"""Comparison helpers for the kernel tests (relative error against a float64 reference)."""

from __future__ import annotations

import torch

FP32_TOL = 1e-5  # max |a - b| / max |b|, float32 kernels against the float64 reference
BF16_TOL = 1e-2


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_close(actual, expected, tol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g}"
