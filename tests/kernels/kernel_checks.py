"""Shared pieces of the kernel tests: comparison against a float64 reference (relative error) and
the product-key search inputs."""

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


def pkm_inputs(T, H, k_dim, n, device, dtype=torch.float32, seed=0, requires_grad=False) -> list[torch.Tensor]:
    """query (T, H, k_dim) and the two half-key sets (H, n, k_dim // 2), standard normal, seeded."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, k_dim, generator=g)
    k1 = torch.randn(H, n, k_dim // 2, generator=g)
    k2 = torch.randn(H, n, k_dim // 2, generator=g)
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (q, k1, k2)]
