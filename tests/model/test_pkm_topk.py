"""Product-key top-k equals the exact top-k over all n_keys**2 combined keys."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kernels
from kernels import reference

MIN_GAP = 1e-4  # ranking margin demanded of the random draws (fp32 error is ~1e-6)


def exact_topk_float64(query: np.ndarray, keys1: np.ndarray, keys2: np.ndarray, k: int):
    """Independent brute force: every slot's score in float64, argsort, explicit softmax.

    Returns (weights, indices, sorted scores of the top k + 1) per (token, head).
    """
    T, H, _ = query.shape
    n, half = keys1.shape[1], keys1.shape[2]
    weights = np.zeros((T, H, k))
    indices = np.zeros((T, H, k), dtype=np.int64)
    top_scores = np.zeros((T, H, min(k + 1, n * n)))
    for t in range(T):
        for h in range(H):
            scores = np.empty(n * n)
            for i1 in range(n):
                s1 = float(np.dot(query[t, h, :half], keys1[h, i1]))
                for i2 in range(n):
                    scores[i1 * n + i2] = s1 + float(np.dot(query[t, h, half:], keys2[h, i2]))
            order = np.argsort(-scores, kind="stable")
            best = scores[order[:k]]
            e = np.exp(best - best.max())
            weights[t, h] = e / e.sum()
            indices[t, h] = order[:k]
            top_scores[t, h] = scores[order[: k + 1]]
    return weights, indices, top_scores


def draw_without_ties(T: int, H: int, n: int, k_dim: int, k: int, seed: int):
    """Random fp32 inputs whose top-(k+1) float64 scores are separated by MIN_GAP (redraw otherwise)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(20):
        query = torch.randn(T, H, k_dim, generator=gen)
        keys1 = torch.randn(H, n, k_dim // 2, generator=gen)
        keys2 = torch.randn(H, n, k_dim // 2, generator=gen)
        expected = exact_topk_float64(query.double().numpy(), keys1.double().numpy(), keys2.double().numpy(), k)
        if np.all(-np.diff(expected[2], axis=-1) > MIN_GAP):
            return query, keys1, keys2, expected
    raise AssertionError("could not draw tie-free inputs; lower MIN_GAP or change sizes")


SHAPES = [  # (heads, k, n_keys, k_dim)
    (1, 1, 4, 2),
    (2, 5, 16, 8),
    (4, 7, 32, 16),
    (3, 12, 12, 6),  # k == n_keys
    (2, 16, 24, 4),
    (4, 3, 50, 12),
]


@pytest.mark.parametrize("heads,k,n_keys,k_dim", SHAPES)
def test_product_key_topk_equals_exact_topk(heads, k, n_keys, k_dim):
    T = 6
    query, keys1, keys2, (want_w, want_i, _) = draw_without_ties(T, heads, n_keys, k_dim, k, seed=heads * 1000 + k)

    weights, indices = kernels.pkm_topk(query, keys1, keys2, k, backend="torch")
    assert weights.shape == indices.shape == (T, heads, k)
    assert weights.dtype == torch.float32 and indices.dtype == torch.int64
    # same slots in the same (descending score) order
    np.testing.assert_array_equal(indices.numpy(), want_i)
    np.testing.assert_allclose(weights.double().numpy(), want_w, rtol=0, atol=1e-6)

    bf_w, bf_i = reference.brute_force_topk(query, keys1, keys2, k)
    np.testing.assert_array_equal(bf_i.numpy(), want_i)
    np.testing.assert_allclose(bf_w.double().numpy(), want_w, rtol=0, atol=1e-6)
    assert torch.allclose(weights.sum(-1), torch.ones(T, heads), atol=1e-6)


def test_raw_scores_are_the_selected_slot_scores():
    heads, k, n, k_dim = 2, 5, 16, 8
    query, keys1, keys2, _ = draw_without_ties(4, heads, n, k_dim, k, seed=7)
    scores, indices = reference.pkm_scores_topk(query.double(), keys1.double(), keys2.double(), k)
    i1, i2 = indices // n, indices % n
    half = k_dim // 2
    for t in range(4):
        for h in range(heads):
            for j in range(k):
                want = query[t, h, :half].double() @ keys1[h, i1[t, h, j]].double()
                want += query[t, h, half:].double() @ keys2[h, i2[t, h, j]].double()
                assert math.isclose(scores[t, h, j].item(), want.item(), rel_tol=0, abs_tol=1e-12)


def test_auto_backend_on_cpu_is_the_reference():
    query, keys1, keys2, _ = draw_without_ties(3, 2, 8, 4, 3, seed=3)
    auto = kernels.pkm_topk(query, keys1, keys2, 3)
    ref = reference.pkm_topk(query, keys1, keys2, 3)
    assert torch.equal(auto[1], ref[1]) and torch.equal(auto[0], ref[0])


def test_pkm_topk_rejects_bad_shapes():
    q = torch.randn(2, 1, 8)
    keys = torch.randn(1, 4, 4)
    with pytest.raises(ValueError, match="memory.k"):
        kernels.pkm_topk(q, keys, keys, 5)
    with pytest.raises(ValueError, match="half-key"):
        kernels.pkm_topk(torch.randn(2, 1, 6), keys, keys, 2)
    with pytest.raises(ValueError, match="memory.kernel"):
        kernels.pkm_topk(q, keys, keys, 2, backend="cuda")
