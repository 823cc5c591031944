"""Fused product-key top-k (kernels.pkm_triton) against the float64 PyTorch reference."""

from __future__ import annotations

import functools

import pytest
import torch

from kernel_checks import BF16_TOL, FP32_TOL, assert_close, pkm_inputs
from kernels import pkm_triton, reference

# (T, H, k_dim, n_keys, k): k not a power of two, n_keys not a multiple of the tile,
# a half dim that is not a power of two, a single token, the largest test shape.
CASES = [(20, 2, 16, 40, 5), (17, 1, 24, 33, 8), (1, 3, 16, 16, 3), (16, 1, 32, 128, 32), (9, 2, 8, 7, 7)]


_inputs = functools.partial(pkm_inputs, requires_grad=True)


def _grads(weights, inputs, probe):
    return torch.autograd.grad((weights.float() * probe).sum(), inputs)


@pytest.mark.parametrize("T,H,k_dim,n,k", CASES)
def test_matches_reference_fp32(T, H, k_dim, n, k, device):
    inputs = _inputs(T, H, k_dim, n, device, seed=T * 1000 + n)
    w, idx = pkm_triton.pkm_topk(*inputs, k)
    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in inputs]
    w_ref, idx_ref = reference.pkm_topk(*ref_inputs, k)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32
    assert torch.equal(idx.cpu(), idx_ref), "selected slots differ from the reference"
    assert_close(w, w_ref, FP32_TOL, "weights")
    probe = torch.randn(T, H, k, dtype=torch.float64)
    for name, got, want in zip(
        ("dquery", "dkeys1", "dkeys2"), _grads(w, inputs, probe.to(device)), _grads(w_ref, ref_inputs, probe)
    ):
        assert_close(got, want, FP32_TOL, name)


def test_indices_are_exact_topk_over_all_slots(device):
    """Independent of the product-key reference: brute force over all n*n slots."""
    q, k1, k2 = _inputs(12, 2, 16, 24, device, seed=7)
    w, idx = pkm_triton.pkm_topk(q, k1, k2, 6)
    w_bf, idx_bf = reference.brute_force_topk(
        q.detach().cpu().double(), k1.detach().cpu().double(), k2.detach().cpu().double(), 6
    )
    assert torch.equal(idx.cpu(), idx_bf)
    assert_close(w, w_bf, FP32_TOL, "weights vs brute force")


@pytest.mark.parametrize("block_n,k", [(16, 8), (16, 12), (32, 3), (16, 1), (16, 2)])
def test_running_topk_across_many_key_tiles(block_n, k, device):
    """Small key tiles: the threshold merge of the running top-k runs over 4-7 tiles."""
    q, k1, k2 = (t.detach() for t in _inputs(16, 2, 16, 100, device, seed=11 + k))
    w, idx = pkm_triton.pkm_topk_forward(q, k1, k2, k, launch=(16, block_n, 4))
    w_bf, idx_bf = reference.brute_force_topk(q.cpu().double(), k1.cpu().double(), k2.cpu().double(), k)
    assert torch.equal(idx.cpu(), idx_bf)
    assert_close(w, w_bf, FP32_TOL, "weights vs brute force")


def test_candidate_pairs_cover_every_winner():
    """The pruned pair list holds the top k of all k*k sums of two sorted lists (random
    trials, including many ties), and has sum_i floor(k / i) pairs, not k*k."""
    g = torch.Generator().manual_seed(0)
    for k in (1, 3, 5, 16, 32):
        pairs = pkm_triton._candidate_pairs(k, torch.device("cpu"))
        got = {(a, b) for a, b in pairs.T.tolist() if a >= 0}
        assert len(got) == sum(k // i for i in range(1, k + 1))
        for trial in range(50):
            v1, v2 = (torch.randn(k, generator=g, dtype=torch.float64).sort(descending=True).values for _ in "ab")
            if trial % 5 == 0:
                v1, v2 = v1.round(), v2.round()  # ties
            sums = (v1[:, None] + v2[None, :]).flatten()
            kth = sums.topk(k).values[-1]
            # every sum strictly above the k-th largest must be a listed pair
            winners = {(i // k, i % k) for i in torch.nonzero(sums > kth).flatten().tolist()}
            assert winners <= got, f"k={k}: winners {sorted(winners - got)} not in the pair list"


def test_bf16_storage(device):
    T, H, k_dim, n, k = 16, 2, 32, 48, 8
    inputs = _inputs(T, H, k_dim, n, device, dtype=torch.bfloat16, seed=3)
    w, idx = pkm_triton.pkm_topk(*inputs, k)
    assert w.dtype == torch.bfloat16
    # The kernel accumulates bf16 products in fp32: compare with the float64 reference
    # on the same (bf16-representable) inputs.
    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in inputs]
    w_ref, idx_ref = reference.pkm_topk(*ref_inputs, k)
    assert torch.equal(idx.cpu(), idx_ref)
    assert_close(w, w_ref, BF16_TOL, "bf16 weights")
    probe = torch.randn(T, H, k, dtype=torch.float64)
    for name, got, want in zip(
        ("dquery", "dkeys1", "dkeys2"), _grads(w, inputs, probe.to(device)), _grads(w_ref, ref_inputs, probe)
    ):
        assert got.dtype == torch.bfloat16
        assert_close(got, want, BF16_TOL, name)


def test_bad_shapes_are_refused(device):
    q, k1, k2 = _inputs(4, 2, 16, 8, device)
    with pytest.raises(ValueError, match="k=9"):
        pkm_triton.pkm_topk_forward(q, k1, k2, 9)
    with pytest.raises(ValueError, match="do not match"):
        pkm_triton.pkm_topk_forward(q[..., :8], k1, k2, 2)
