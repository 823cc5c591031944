"""Triton scoring backward (kernels.pkm_bwd_triton) against float64 autograd on the same indices.

The reference re-scores the saved slots in float64 (gather of the half scores, softmax)
and differentiates with autograd: independent of the kernel's dedup, sort and segments.
"""

from __future__ import annotations

import pytest
import torch

from kernel_checks import BF16_TOL, FP32_TOL, assert_close, pkm_inputs
from kernels import pkm_bwd_triton, pkm_triton


def _score_grads_ref(query, keys1, keys2, indices, probe):
    """float64 (weights, dquery, dkeys1, dkeys2) of sum(probe * softmax(scores of `indices`))."""
    q, k1, k2 = (t.detach().cpu().double().requires_grad_() for t in (query, keys1, keys2))
    n, half = k1.shape[1], k1.shape[2]
    idx = indices.cpu()
    s1 = torch.einsum("thd,hnd->thn", q[..., :half], k1)
    s2 = torch.einsum("thd,hnd->thn", q[..., half:], k2)
    w = (s1.gather(-1, idx // n) + s2.gather(-1, idx % n)).softmax(-1)
    return (w.detach(), *torch.autograd.grad((w * probe.double()).sum(), [q, k1, k2]))


def _crowded_indices(T, H, k, n, seed):
    """Slot ids drawn from few half-key ids: ids repeat within each row (the dedup) and
    across many tokens (segments of many entries). Distinct per row, as top-k slots are."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(n * n, generator=g)[:k] for _ in range(T * H)]
    idx = torch.stack(rows).reshape(T, H, k)
    hot = torch.randint(0, 3, (T, H, k), generator=g)  # half of the first ids crowd into 0..2
    i1 = torch.where(torch.rand(T, H, k, generator=g) < 0.5, hot, idx // n)
    slots = i1 * n + idx % n
    for r in slots.view(-1, k):  # keep slots distinct within a row: repeats take unused slots
        seen, repeats = set(), []
        for j, v in enumerate(r.tolist()):
            (repeats.append(j) if v in seen else seen.add(v))
        r[repeats] = torch.tensor([s for s in range(n * n) if s not in seen][: len(repeats)], dtype=r.dtype)
    return slots


# (T, H, k_dim, n, k): k not a power of two (3, 5, 7, 12), k = n, k = 1, half dims that are
# not powers of two (12), one token.
CASES = [(9, 2, 16, 7, 7), (16, 1, 24, 12, 5), (1, 3, 16, 16, 3), (12, 2, 8, 10, 12), (6, 2, 16, 5, 1)]


@pytest.mark.parametrize("T,H,k_dim,n,k", CASES)
def test_fp32_gradients_match_float64(T, H, k_dim, n, k, device, poison_empty):
    q, k1, k2 = pkm_inputs(T, H, k_dim, n, device, seed=T + n + k)
    indices = _crowded_indices(T, H, k, n, seed=k)
    probe = torch.randn(T, H, k, dtype=torch.float64)
    w64, *want = _score_grads_ref(q, k1, k2, indices, probe)
    # Every output element must be written by the kernel (untouched key rows as zeros):
    # poison uninitialised memory so a skipped one reads NaN.
    poison_empty()
    got = pkm_bwd_triton.score_backward(probe.float().to(device), q, k1, k2, w64.float().to(device), indices.to(device))
    for name, a, b in zip(("dquery", "dkeys1", "dkeys2"), got, want):
        assert a.dtype == torch.float32
        assert_close(a, b, FP32_TOL, name)


def test_bf16_gradients_within_1e_2(device):
    T, H, k_dim, n, k = 16, 2, 32, 12, 6
    q, k1, k2 = pkm_inputs(T, H, k_dim, n, device, dtype=torch.bfloat16, seed=3)
    indices = _crowded_indices(T, H, k, n, seed=3)
    probe = torch.randn(T, H, k, dtype=torch.float64)
    w64, *want = _score_grads_ref(q, k1, k2, indices, probe)
    got = pkm_bwd_triton.score_backward(
        probe.to(device, torch.bfloat16), q, k1, k2, w64.float().to(device), indices.to(device)
    )
    for name, a, b in zip(("dquery", "dkeys1", "dkeys2"), got, want):
        assert a.dtype == torch.bfloat16
        assert_close(a, b, BF16_TOL, name)


def test_ties_through_the_fused_path(device):
    """Equal half-keys make equal scores: the forward breaks ties by index, and the
    gradients of the slots it chose match float64 on those same slots; the chosen
    scores are the brute-force top k."""
    T, H, k_dim, n, k = 10, 2, 16, 9, 7
    q, k1, k2 = pkm_inputs(T, H, k_dim, n, device, seed=5)
    k1[:, 3] = k1[:, 1]  # tied half scores in both sets
    k2[:, 4] = k2[:, 0]
    k2[:, 7] = k2[:, 0]
    q, k1, k2 = (t.requires_grad_() for t in (q, k1, k2))
    w, idx = pkm_triton.pkm_topk(q, k1, k2, k)
    probe = torch.randn(T, H, k, dtype=torch.float64)
    got = torch.autograd.grad((w.double() * probe.to(device)).sum(), [q, k1, k2])
    w64, *want = _score_grads_ref(q, k1, k2, idx, probe)
    assert_close(w, w64, FP32_TOL, "weights")
    for name, a, b in zip(("dquery", "dkeys1", "dkeys2"), got, want):
        assert_close(a, b, FP32_TOL, name)
    qd, k1d, k2d = (t.detach().cpu().double() for t in (q, k1, k2))
    s1 = torch.einsum("thd,hnd->thn", qd[..., :8], k1d)
    s2 = torch.einsum("thd,hnd->thn", qd[..., 8:], k2d)
    full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)
    chosen = full.gather(-1, idx.cpu()).sort(-1, descending=True).values
    assert torch.allclose(chosen, full.topk(k).values, rtol=0, atol=1e-5)
    assert torch.equal(s1[..., 3], s1[..., 1]) and torch.equal(s2[..., 7], s2[..., 0])


def test_repeated_runs_are_bitwise_identical(device):
    T, H, k_dim, n, k = 16, 2, 16, 6, 5  # 160 entries per half on 6 ids per head: long segments
    q, k1, k2 = pkm_inputs(T, H, k_dim, n, device, seed=8)
    indices = _crowded_indices(T, H, k, n, seed=8).to(device)
    w = torch.rand(T, H, k).softmax(-1).to(device)
    g = torch.randn(T, H, k).to(device)
    first = pkm_bwd_triton.score_backward(g, q, k1, k2, w, indices)
    for _ in range(2):
        again = pkm_bwd_triton.score_backward(g, q, k1, k2, w, indices)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_agrees_with_the_torch_backward(device):
    """The earlier PyTorch backward on the same saved tensors gives the same gradients
    (a second implementation, on indices from the fused forward)."""
    T, H, k_dim, n, k = 8, 2, 16, 20, 5
    q, k1, k2 = pkm_inputs(T, H, k_dim, n, device, seed=9)
    w, idx = pkm_triton.pkm_topk_forward(q, k1, k2, k)
    g = torch.randn(T, H, k).to(device)
    triton_grads = pkm_triton.pkm_topk_backward(g, q, k1, k2, w, idx)
    torch_grads = pkm_triton.pkm_topk_backward_torch(g, q, k1, k2, w, idx)
    for name, a, b in zip(("dquery", "dkeys1", "dkeys2"), triton_grads, torch_grads):
        assert_close(a, b, FP32_TOL, name)


def test_sort_keys_fit_int16_only_when_the_range_does():
    assert pkm_bwd_triton._sort_dtype(2 * 4 * 1024 + 1) == torch.int16
    assert pkm_bwd_triton._sort_dtype(2**15) == torch.int32


@pytest.mark.parametrize("T,H,k_dim,n,k", [(16, 1, 24, 12, 5), (12, 2, 8, 10, 12)])
def test_hot_keys_are_reduced_in_chunks(T, H, k_dim, n, k, device, monkeypatch):
    """A half-key chosen by many tokens is cut into chunks of KEY_CHUNK entries whose
    partial rows are summed in order: same gradients as float64, bitwise repeatable.
    With chunks of 3, the crowded ids 0..2 span several chunks (checked)."""
    monkeypatch.setattr(pkm_bwd_triton, "KEY_CHUNK", 3)
    q, k1, k2 = pkm_inputs(T, H, k_dim, n, device, seed=T + k)
    indices = _crowded_indices(T, H, k, n, seed=k + 1)
    rows_per_id = torch.bincount(torch.cat([torch.unique(r // n) for r in indices.view(-1, k)]), minlength=n)
    assert rows_per_id.max() > 2 * 3, "no key spans three chunks"
    probe = torch.randn(T, H, k, dtype=torch.float64)
    w64, *want = _score_grads_ref(q, k1, k2, indices, probe)
    args = (probe.float().to(device), q, k1, k2, w64.float().to(device), indices.to(device))
    got = pkm_bwd_triton.score_backward(*args)
    for name, a, b in zip(("dquery", "dkeys1", "dkeys2"), got, want):
        assert_close(a, b, FP32_TOL, name)
    again = pkm_bwd_triton.score_backward(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, again))
