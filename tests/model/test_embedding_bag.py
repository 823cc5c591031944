"""The weighted embedding bag: reference vs gather formulation vs an explicit float64 loop."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import reference
from tests.tensor_watch import LargestFloatTensor


def bag_loop_float64(values: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    T, H, K = indices.shape
    out = torch.zeros(T, values.shape[1], dtype=torch.float64)
    for t in range(T):
        for h in range(H):
            for j in range(K):
                out[t] += weights[t, h, j].double() * values[indices[t, h, j]].double()
    return out


def draw(T=5, H=3, K=4, N=20, d=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(N, d, generator=gen)
    indices = torch.randint(0, N, (T, H, K), generator=gen)
    indices[0, 1, 0] = indices[0, 0, 0]  # the same row read by two heads of one token
    indices[1, 0, 1] = indices[-1, -1, -1]  # and by two tokens
    weights = torch.rand(T, H, K, generator=gen).softmax(-1)
    return values, indices, weights


def test_bag_matches_gather_and_float64_loop():
    values, indices, weights = draw()
    want = bag_loop_float64(values, indices, weights)
    for got in (
        reference.embedding_bag(values, indices, weights),
        reference.embedding_bag_gather(values, indices, weights),
        kernels.embedding_bag(values, indices, weights, backend="torch"),
    ):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


def test_bag_gradients_match_gather_formulation():
    values, indices, weights = draw(N=200, seed=1)
    grads = []
    for fn in (reference.embedding_bag, reference.embedding_bag_gather):
        v = values.double().requires_grad_()
        w = weights.double().requires_grad_()
        out = fn(v, indices, w)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out))
        grads.append((v.grad, w.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=1e-12)
    # rows never read get no gradient (rows read twice are covered by the comparison above)
    unread = torch.ones(values.shape[0], dtype=torch.bool)
    unread[indices.flatten()] = False
    assert unread.any() and grads[0][0][unread].abs().max() == 0


def test_bag_gradcheck_float64():
    values, indices, weights = draw(T=3, H=2, K=3, N=7, d=4, seed=2)
    v = values.double().requires_grad_()
    w = weights.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda v, w: reference.embedding_bag(v, indices, w), (v, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_table_accumulates_in_fp32(dtype):
    values, indices, weights = draw(K=16, d=8, seed=3)
    table = values.to(dtype)
    want = bag_loop_float64(table, indices, weights)  # same rounded rows, exact accumulation
    got = reference.embedding_bag(table, indices, weights)
    assert got.dtype == dtype
    # one final rounding to the table's dtype, not one per accumulated row
    eps = torch.finfo(dtype).eps
    assert ((got.double() - want).abs() <= eps * want.abs() + 1e-6).all()


def test_bag_rejects_mismatched_shapes():
    values, indices, weights = draw()
    with pytest.raises(ValueError, match="must match"):
        kernels.embedding_bag(values, indices, weights[..., :-1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_bag_upcasts_only_the_rows_read(dtype):
    """The fp32 accumulation reads the selected rows alone: until 2026-12-07 the whole pool was
    copied to fp32 at every lookup (a bf16 export's decoding ~90x slower at 1M slots)."""
    values, indices, weights = draw(K=16, N=4096, d=8, seed=4)
    table = values.to(dtype)
    with LargestFloatTensor() as seen:
        got = reference.embedding_bag(table, indices, weights)
    largest, pool = seen.largest, table.numel()
    assert largest < pool
    # the same sums as the fp32 copy of the whole pool gave (the float64 bound: the test above)
    whole = torch.nn.functional.embedding_bag(
        indices.flatten(1), table.float(), per_sample_weights=weights.flatten(1).float(), mode="sum"
    )
    assert torch.equal(got, whole.to(dtype))
    empty = reference.embedding_bag(table, indices[:0], weights[:0])
    assert empty.shape == (0, 8) and empty.dtype == dtype
    # a lookup of more entries than half the pool upcasts the whole pool (cheaper than sorting them)
    small = table[:400]
    whole = torch.nn.functional.embedding_bag(
        indices.flatten(1) % 400, small.float(), per_sample_weights=weights.flatten(1).float(), mode="sum"
    )
    assert torch.equal(reference.embedding_bag(small, indices % 400, weights), whole.to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_bag_weight_gradient_upcasts_only_the_rows_read(dtype):
    """The CPU backward's weight gradient reads the selected rows in fp32, as the forward does:
    until 2026-12-07 it copied the whole pool to fp32 at every backward (1M x 128 bf16 pool,
    64 tokens: 0.6-0.7 s of a weights-only backward, 6-10 ms after)."""
    from kernels import ops

    values, indices, weights = draw(K=16, N=4096, d=8, seed=5)
    table = values.to(dtype)
    grad_out = torch.randn(indices.shape[0], 8, generator=torch.Generator().manual_seed(6)).to(dtype)
    with LargestFloatTensor() as seen:
        dv, dw = ops._embedding_bag_backward_aten(grad_out, table, indices, weights, False, True)
    assert dv is None and seen.largest < table.numel()
    # float64 reference: d weight[t, h, j] = <grad_out[t], value row read>
    want = torch.einsum("td,thkd->thk", grad_out.double(), table.double()[indices])
    torch.testing.assert_close(dw.double(), want, rtol=1e-6, atol=1e-6)
    # a backward of more entries than half the pool upcasts the whole pool, the same gradient
    _, dw_small = ops._embedding_bag_backward_aten(grad_out, table[:100], indices % 100, weights, False, True)
    want = torch.einsum("td,thkd->thk", grad_out.double(), table[:100].double()[indices % 100])
    torch.testing.assert_close(dw_small.double(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_sparse_bag_weight_gradient_upcasts_only_the_rows_read(dtype):
    """value_grad="sparse" (the large pools') read the whole pool in fp32 for its weight gradient
    until 2026-12-07 (bf16 1M x 128, 64 tokens: 0.46 s, 2 ms after); the rows read are enough."""
    values, indices, weights = draw(K=16, N=4096, d=8, seed=7)
    table = values.to(dtype)
    weights.requires_grad_(True)
    grad_out = torch.randn(indices.shape[0], 8, generator=torch.Generator().manual_seed(8)).to(dtype)
    out = reference.embedding_bag_sparse(table, indices, weights)
    with LargestFloatTensor() as seen:
        (dw,) = torch.autograd.grad(out, weights, grad_out)
    assert seen.largest < table.numel()
    want = torch.einsum("td,thkd->thk", grad_out.double(), table.double()[indices])
    torch.testing.assert_close(dw.double(), want, rtol=1e-6, atol=1e-6)
