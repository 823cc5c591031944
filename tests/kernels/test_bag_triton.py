"""Embedding bag (kernels.bag_triton): forward and every gradient form against float64."""

from __future__ import annotations

import pytest
import torch

from kernel_checks import BF16_TOL, FP32_TOL, assert_close
from kernels import bag_triton, reference

# (N rows, d, T, H, k): d not a power of two, k not a power of two, few rows (many
# duplicate indices within and across tokens), a single token, d > the column tile.
CASES = [(50, 37, 9, 3, 5), (7, 16, 6, 2, 4), (300, 70, 1, 2, 3), (40, 5, 5, 1, 12)]
VALUE_GRADS = ("sorted", "atomic", "sparse")


def _inputs(N, d, T, H, k, device, dtype=torch.float32, seed=0, zero_weights=True):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(N, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    indices = torch.randint(0, N, (T, H, k), generator=g)
    indices[0, 0, :] = indices[0, 0, 0]  # the same row several times in one bag
    weights = torch.randn(T, H, k, generator=g)
    if zero_weights:
        weights[:, :, ::3] = 0.0
    return values, indices.to(device), weights.to(device=device, dtype=dtype).requires_grad_()


def _reference(values, indices, weights, probe):
    v = values.detach().cpu().double().requires_grad_()
    w = weights.detach().cpu().double().requires_grad_()
    out = reference.embedding_bag_gather(v, indices.cpu(), w)
    dv, dw = torch.autograd.grad((out * probe).sum(), [v, w])
    return out, dv, dw


def _run(values, indices, weights, probe, value_grad):
    out = bag_triton.embedding_bag(values, indices, weights, value_grad=value_grad)
    dv, dw = torch.autograd.grad((out.float() * probe.to(out.device, torch.float32)).sum(), [values, weights])
    return out, (dv.to_dense() if dv.is_sparse else dv), dw


@pytest.mark.parametrize("value_grad", VALUE_GRADS)
@pytest.mark.parametrize("N,d,T,H,k", CASES)
def test_matches_reference_fp32(N, d, T, H, k, value_grad, device):
    values, indices, weights = _inputs(N, d, T, H, k, device, seed=N + d + T)
    probe = torch.randn(T, d, dtype=torch.float64)
    out, dv, dw = _run(values, indices, weights, probe, value_grad)
    out_ref, dv_ref, dw_ref = _reference(values, indices, weights, probe)
    assert out.dtype == dv.dtype == torch.float32
    assert_close(out, out_ref, FP32_TOL, "bag output")
    assert_close(dv, dv_ref, FP32_TOL, f"value gradient ({value_grad})")
    assert_close(dw, dw_ref, FP32_TOL, "weight gradient")


@pytest.mark.parametrize("value_grad", VALUE_GRADS)
def test_bf16_storage(value_grad, device):
    values, indices, weights = _inputs(60, 24, 8, 2, 6, device, dtype=torch.bfloat16, seed=11)
    probe = torch.randn(8, 24, dtype=torch.float64)
    out, dv, dw = _run(values, indices, weights, probe, value_grad)
    out_ref, dv_ref, dw_ref = _reference(values, indices, weights, probe)
    assert out.dtype == dv.dtype == dw.dtype == torch.bfloat16
    assert_close(out, out_ref, BF16_TOL, "bf16 bag output")
    assert_close(dv, dv_ref, BF16_TOL, "bf16 value gradient")
    assert_close(dw, dw_ref, BF16_TOL, "bf16 weight gradient")


def test_sorted_value_grad_is_bitwise_deterministic(device):
    values, indices, weights = _inputs(10, 33, 16, 4, 8, device, seed=5)  # 512 entries on 10 rows
    grad_out = torch.randn(16, 33).to(device)
    first = bag_triton.bag_value_grad_sorted(grad_out, indices, weights.detach(), 10, torch.float32)
    for _ in range(2):
        again = bag_triton.bag_value_grad_sorted(grad_out, indices, weights.detach(), 10, torch.float32)
        assert torch.equal(first, again)


def test_sparse_form_lists_only_touched_rows(device, poison_empty):
    values, indices, weights = _inputs(100, 12, 3, 2, 4, device, seed=9)
    grad_out = torch.randn(3, 12).to(device)
    rows, grad_rows = bag_triton.bag_value_grad_sparse(grad_out, indices, weights.detach(), torch.float32)
    assert torch.equal(rows.cpu(), torch.unique(indices.cpu()))
    # The dense form writes every row itself (no zero fill): poison uninitialised memory
    # so that a row the kernel skipped would read NaN instead of a lucky zero.
    poison_empty()
    dense = bag_triton.bag_value_grad_sorted(grad_out, indices, weights.detach(), 100, torch.float32)
    assert torch.equal(dense[rows], grad_rows)
    untouched = torch.ones(100, dtype=torch.bool)
    untouched[rows.cpu()] = False
    assert not dense.cpu()[untouched].any()


@pytest.mark.parametrize("value_grad,d", [("sorted", 37), ("sparse", 37), ("sorted", 70)])
def test_hot_rows_are_split_into_chunks(value_grad, d, device, monkeypatch):
    """A row read far more often than the others (a hot slot) is reduced in chunks of
    ROW_CHUNK entries whose partial rows are summed in order: same gradients, still
    bitwise reproducible. Rows 5 and 11 take 48 and 7 of the 96 entries; chunks of 4;
    d=70 spans two column tiles in the interpreter."""
    monkeypatch.setattr(bag_triton, "ROW_CHUNK", 4)
    values, indices, weights = _inputs(20, d, 8, 3, 4, device, seed=4)
    flat = indices.view(-1)
    flat[::2] = 5
    flat[1:15:2] = 11
    probe = torch.randn(8, d, dtype=torch.float64)
    out, dv, dw = _run(values, indices, weights, probe, value_grad)
    out_ref, dv_ref, dw_ref = _reference(values, indices, weights, probe)
    assert_close(out, out_ref, FP32_TOL, "bag output")
    assert_close(dv, dv_ref, FP32_TOL, "value gradient with hot rows")
    assert_close(dw, dw_ref, FP32_TOL, "weight gradient with hot rows")
    again = _run(values, indices, weights, probe, value_grad)
    assert torch.equal(again[1], dv) and torch.equal(again[2], dw)


@pytest.mark.parametrize("value_grad", ["sorted", "sparse"])
def test_hot_row_launches_are_sized_for_the_most_chunks_the_entries_allow(
    value_grad, device, monkeypatch, poison_empty
):
    """The hot-row launches are sized from the entry count M alone: at most M // (ROW_CHUNK + 1)
    hot rows in at most M // ROW_CHUNK + that many chunks. Rows of ROW_CHUNK + 1 entries and
    nothing else reach both bounds (3 hot rows of 5 entries, chunks of 4: 6 chunks for M = 15):
    a launch one program short leaves a row's last chunk or its sum out of the gradient."""
    monkeypatch.setattr(bag_triton, "ROW_CHUNK", 4)
    poison_empty()
    values, _, weights = _inputs(12, 37, 5, 1, 3, device, seed=6, zero_weights=False)
    indices = torch.tensor([2, 6, 9] * 5).view(5, 1, 3).to(device)  # rows 2, 6 and 9 take 5 entries each
    probe = torch.randn(5, 37, dtype=torch.float64)
    out, dv, dw = _run(values, indices, weights, probe, value_grad)
    _, dv_ref, dw_ref = _reference(values, indices, weights, probe)
    assert_close(dv, dv_ref, FP32_TOL, "value gradient, every hot-row program used")
    assert_close(dw, dw_ref, FP32_TOL, "weight gradient, every hot-row program used")


def test_column_slice_of_the_pool_is_read_in_place(device):
    full, indices, weights = _inputs(30, 40, 5, 2, 3, device, seed=2)
    part = full[:, 8:29]
    probe = torch.randn(5, 21, dtype=torch.float64)
    out = bag_triton.embedding_bag(part, indices, weights)
    (dv,) = torch.autograd.grad((out * probe.to(device, torch.float32)).sum(), [full])
    out_ref, dv_ref, _ = _reference(part, indices, weights, probe)
    assert_close(out, out_ref, FP32_TOL, "sliced bag output")
    assert_close(dv[:, 8:29], dv_ref, FP32_TOL, "sliced value gradient")
    assert not dv[:, :8].any() and not dv[:, 29:].any()


def test_out_of_range_indices_are_refused(device):
    values, indices, weights = _inputs(10, 8, 2, 1, 2, device)
    indices[1, 0, 1] = 10
    with pytest.raises(ValueError, match="outside the value table"):
        bag_triton.embedding_bag(values, indices, weights)
    with pytest.raises(ValueError, match="value_grad"):
        bag_triton.embedding_bag(values, indices.clamp(max=9), weights, value_grad="fast")


def test_the_memory_layers_bag_reads_nothing_on_the_host(device, monkeypatch):
    """The bag as the memory layers call it (the custom op, check_indices=False), forward and
    backward with hot rows chunked: no host read of a device tensor (tests/host_syncs.py), which on
    a GPU would wait for every queued kernel. It read the indices' range (2 numbers), sized a
    bincount and asked whether any row was hot. The public default still reads the range: once."""
    import kernels.ops
    from tests.host_syncs import HostSyncs

    monkeypatch.setattr(bag_triton, "ROW_CHUNK", 4)
    values, indices, weights = _inputs(20, 37, 8, 3, 4, device, seed=4)
    indices.view(-1)[::2] = 5  # 48 of the 96 entries: a hot row in 12 chunks

    def lookup():
        out = kernels.ops.embedding_bag(values, indices, weights, backend="triton", check_indices=False)
        return torch.autograd.grad(out.sum(), [values, weights])

    lookup()  # on a GPU the first call autotunes (timing reads on the host)
    with HostSyncs() as syncs:
        dv, dw = lookup()
    assert not syncs.syncs, syncs.report()
    probe = torch.ones(8, 37, dtype=torch.float64)
    _, dv_ref, dw_ref = _reference(values, indices, weights, probe)
    assert_close(dv, dv_ref, FP32_TOL, "value gradient, hot row chunked")
    assert_close(dw, dw_ref, FP32_TOL, "weight gradient, hot row chunked")
    with HostSyncs() as syncs:
        kernels.ops.embedding_bag(values, indices, weights, backend="triton")
    assert [s.site.rsplit(" in ", 1)[1] for s in syncs.syncs] == ["_check"]
