"""The custom ops (kernels/ops.py): schema, fake and autograd registrations (opcheck), the
PyTorch backward formulas against the reference's float64 autograd, and the Triton path
bit-for-bit equal to calling the Triton autograd functions directly."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import BF16_TOL, FP32_TOL, assert_close
from kernels import cpu_ops, ops, reference


def _lookup_inputs(device, dtype, T=12, H=2, k_dim=16, n=8, k=4, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k1, k2 = (
        torch.randn(T, H, k_dim, generator=g),
        torch.randn(H, n, k_dim // 2, generator=g),
        torch.randn(H, n, k_dim // 2, generator=g),
    )
    values = torch.randn(n * n, d, generator=g)
    return [t.to(device=device, dtype=dtype).requires_grad_() for t in (q, k1, k2, values)] + [k]


def _all_grads(q, k1, k2, values, k, backend, via_ops: bool):
    topk = ops.pkm_topk if via_ops else __import__("kernels").pkm_topk
    bag = ops.embedding_bag if via_ops else __import__("kernels").embedding_bag
    w, idx = topk(q, k1, k2, k, backend=backend)
    out = bag(values, idx, w, backend=backend)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return out, idx, torch.autograd.grad((out * probe).sum(), (q, k1, k2, values))


def test_torch_backward_formulas_match_reference_autograd_float64():
    q, k1, k2, values, k = _lookup_inputs("cpu", torch.float64)
    out, idx, got = _all_grads(q, k1, k2, values, k, "torch", via_ops=True)
    w_ref, idx_ref = reference.pkm_topk(q, k1, k2, k)
    out_ref = reference.embedding_bag(values, idx_ref, w_ref)
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    want = torch.autograd.grad((out_ref * probe).sum(), (q, k1, k2, values))
    assert torch.equal(idx, idx_ref) and torch.equal(out, out_ref)
    for name, a, b in zip(("query", "keys1", "keys2", "values"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("formulation", ["dense", "sparse"])
def test_scoring_backward_formulations_match_float64_autograd(formulation, monkeypatch):
    """Both formulations of the PyTorch scoring backward (dense score-gradient matmuls for few
    keys per selected slot, per-row embedding-bag sums otherwise) give the reference's float64
    autograd gradients: in float64 to 1e-12, in fp32 within fp32 rounding (FP32_TOL). The
    tokens go in 3 chunks of 7 and one of 2 (the dense path's chunks)."""
    monkeypatch.setattr(ops, "DENSE_KEY_GRAD_MAX_KEYS_PER_K", 10**9 if formulation == "dense" else 0)
    monkeypatch.setattr(reference, "SCORE_CHUNK_ELEMENTS", 7 * 3 * 10)
    g = torch.Generator().manual_seed(3)
    T, H, n, half, k = 23, 3, 10, 5, 6  # k and H not powers of two: the chunks split heads' rows
    leaves = [torch.randn(T, H, 2 * half, generator=g, dtype=torch.float64)]
    leaves += [torch.randn(H, n, half, generator=g, dtype=torch.float64) for _ in range(2)]
    grad_weights = torch.randn(T, H, k, generator=g, dtype=torch.float64)
    q, k1, k2 = (t.clone().requires_grad_() for t in leaves)
    w_ref, idx = reference.pkm_topk(q, k1, k2, k)
    want = torch.autograd.grad((w_ref * grad_weights).sum(), (q, k1, k2))
    for dtype, check in (
        (torch.float64, lambda a, b, name: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)),
        (torch.float32, lambda a, b, name: assert_close(a, b, FP32_TOL, name)),
    ):
        q, k1, k2 = (t.to(dtype) for t in leaves)
        w, got_idx = reference.pkm_topk_fp32(q, k1, k2, k)
        assert torch.equal(got_idx, idx)
        got = torch.ops.memlayers.pkm_topk_backward(grad_weights.to(dtype), q, k1, k2, w, idx, k, "torch")
        for name, a, b in zip(("query", "keys1", "keys2"), got, want):
            assert a.dtype == dtype and a.is_contiguous()
            check(a, b, f"{name} {dtype}")


def test_the_demo_scoring_backward_takes_the_dense_formulation():
    """configs/tiny.yaml (128 keys, k 16) on CPU: the dense formulation (3.7x faster there on CPU,
    tools/bench_cpu_paths.py); the paper's 1024 keys at k 32 keep the sparse one."""
    cpu = torch.device("cpu")
    assert ops.use_dense_half_key_grads(128, 16, cpu) and ops.use_dense_half_key_grads(512, 32, cpu)
    assert not ops.use_dense_half_key_grads(1024, 32, cpu) and not ops.use_dense_half_key_grads(4096, 16, cpu)
    # an accelerator keeps the sorted sums: a dense scatter there adds with atomics (not reproducible)
    assert not ops.use_dense_half_key_grads(128, 16, torch.device("cuda"))


def test_opcheck_schema_fake_and_autograd():
    q, k1, k2, values, k = _lookup_inputs("cpu", torch.float32)
    torch.library.opcheck(torch.ops.memlayers.pkm_topk, (q, k1, k2, k, "torch"))
    w, idx = ops.pkm_topk(q, k1, k2, k, "torch")
    torch.library.opcheck(
        torch.ops.memlayers.embedding_bag, (values, idx, w.detach().requires_grad_(), "torch", "sorted", True)
    )


def test_bad_backend_is_refused_before_the_op():
    q, k1, k2, values, k = _lookup_inputs("cpu", torch.float32)
    with pytest.raises(ValueError, match="memory.kernel"):
        ops.pkm_topk(q, k1, k2, k, backend="cuda")


def test_triton_ops_equal_the_triton_autograd_functions(device):
    q, k1, k2, values, k = _lookup_inputs(device, torch.float32, seed=1)
    out_op, idx_op, grads_op = _all_grads(q, k1, k2, values, k, "triton", via_ops=True)
    out, idx, grads = _all_grads(q, k1, k2, values, k, "triton", via_ops=False)
    assert torch.equal(idx_op, idx) and torch.equal(out_op, out)
    for name, a, b in zip(("query", "keys1", "keys2", "values"), grads_op, grads):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_bag_backward_is_the_references_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(2)
    values = torch.randn(64, 6, generator=g).to(dtype).requires_grad_()
    indices = torch.randint(0, 64, (10, 2, 4), generator=g)
    weights = torch.rand(10, 2, 4, generator=g).to(dtype).requires_grad_()
    probe = torch.randn(10, 6, generator=g).to(dtype)
    got = torch.autograd.grad((ops.embedding_bag(values, indices, weights, "torch") * probe).sum(), (values, weights))
    want = torch.autograd.grad((reference.embedding_bag(values, indices, weights) * probe).sum(), (values, weights))
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_reference_search_in_token_chunks_equals_brute_force_and_one_chunk(monkeypatch):
    """Chunked scoring (5 tokens at a time here) gives the brute-force top k over all
    n*n slots and, with autograd, the gradients of one chunk (float64: equal up to the
    summation order the matmul picks for another number of rows)."""
    g = torch.Generator().manual_seed(7)
    T, H, n, half, k = 23, 2, 12, 4, 5  # k not a power of two, T not a multiple of the chunk
    leaves = [torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((T, H, 2 * half), (H, n, half))]
    leaves.insert(2, torch.randn(H, n, half, generator=g, dtype=torch.float64))
    probe = torch.randn(T, H, k, generator=g, dtype=torch.float64)
    results = []
    for chunk_elements in (1 << 19, 5 * H * n):
        monkeypatch.setattr(reference, "SCORE_CHUNK_ELEMENTS", chunk_elements)
        q, k1, k2 = (t.clone().requires_grad_() for t in leaves)
        w, idx = reference.pkm_topk(q, k1, k2, k)
        (w * probe).sum().backward()
        results.append((w, idx, q.grad, k1.grad, k2.grad))
    w_bf, idx_bf = reference.brute_force_topk(*leaves, k)
    assert torch.equal(results[1][1], idx_bf)
    torch.testing.assert_close(results[1][0], w_bf, rtol=1e-12, atol=0)
    assert torch.equal(results[0][1], results[1][1])
    for one, chunked in zip(*results):
        torch.testing.assert_close(chunked, one, rtol=1e-12, atol=1e-15)


def test_reference_search_chunks_are_cache_sized_on_cpu_and_whole_batches_elsewhere():
    """The paper's shape (4 heads, 1024 keys): 128 tokens at a time on CPU; on an accelerator
    the whole 8 x 4096-token batch in one chunk (128-token chunks made the PyTorch scoring
    forward 12x slower on an H200: many small launches)."""
    assert reference.score_chunk_rows(torch.device("cpu"), 4, 1024) == 128
    assert reference.score_chunk_rows(torch.device("meta"), 4, 1024) >= 8 * 4096
    assert reference.score_chunk_rows(torch.device("cpu"), 4, 1 << 20) == 1  # never zero


@pytest.mark.parametrize("n, k", [(4096, 32), (2048, 33), (1000, 7), (256, 32), (1001, 8), (40, 40), (5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cpu_row_topk_equals_a_stable_descending_sort(n, k, dtype, cpu_ops_built):
    """The compiled CPU top-k (kernels/csrc/row_topk.cpp) returns exactly the first k indices
    of a stable descending sort: the largest values, ties by lower index, NaN first, with
    +-inf and -0.0 == 0.0; random, heavily tied and adversarial rows."""
    g = torch.Generator().manual_seed(n * 7 + k)
    rows = [
        torch.randn(64, n, generator=g, dtype=torch.float64),
        torch.randn(64, n, generator=g, dtype=torch.float64).mul(2).round(),  # ~13 distinct values per row
        torch.arange(n, dtype=torch.float64).expand(4, n),  # ascending: every block beats the last
        torch.zeros(3, n, dtype=torch.float64),
    ]
    special = torch.randn(8, n, generator=g, dtype=torch.float64)
    special[:, :: max(1, n // 5)] = float("nan")
    special[1:4, 1 :: max(1, n // 3)] = float("inf")
    special[4:, 2 :: max(1, n // 4)] = float("-inf")
    special[2, :] = -0.0
    special[2, ::2] = 0.0
    rows.append(special)
    x = torch.cat(rows).to(dtype)
    got = cpu_ops.row_topk_indices(x, k)
    want = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(got, want)
    assert torch.equal(cpu_ops.row_topk_indices(x.t().contiguous().t(), k), want)  # a strided view


def test_cpu_row_topk_splits_rows_over_threads_with_the_same_result(cpu_ops_built):
    """row_topk runs its rows on torch's intra-op threads (the demo's 2 cores): 1, 2 and 3 threads
    give the stable descending sort's first k, whatever range each thread takes."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2000, 128, generator=g)
    x[::7] = x[::7].round()  # ties in some rows
    want = torch.sort(x, dim=-1, descending=True, stable=True).indices[:, :16]
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(cpu_ops.row_topk_indices(x, 16), want), threads
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n, k", [(4096, 32), (2048, 33), (256, 32), (1001, 8)])
def test_half_topk_gives_topks_values_and_gradients(n, k):
    """`half_topk` (the compiled op on CPU) gives torch.topk's values bitwise, descending, on distinct
    indices that hold them; gradients through it equal those through topk (float64)."""
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(3, 40, n, generator=g, dtype=torch.float64, requires_grad=True)
    values, indices = reference.half_topk(x, k)
    want_values, want_indices = x.topk(k, dim=-1)
    assert torch.equal(values, want_values)
    assert torch.equal(indices, want_indices)  # no ties in random float64 rows
    probe = torch.randn(values.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad((values * probe).sum(), x)
    (want,) = torch.autograd.grad((want_values * probe).sum(), x)
    assert torch.equal(got, want)


def test_cpu_ops_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    """Without a compiler the search still runs: one warning naming the cause, torch.topk's results."""
    import torch.utils.cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built yet (a built library loads without one)

    def no_compiler(**kwargs):
        raise RuntimeError("g++ not found")

    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_ops, "_loaded", None)
    x = torch.randn(6, 300, dtype=torch.float64)
    with pytest.warns(UserWarning, match="g\\+\\+ not found.*torch.topk"):
        assert cpu_ops.row_topk_indices(x, 5) is None
    values, indices = reference.half_topk(x, 5)
    assert torch.equal(values, x.topk(5).values) and torch.equal(indices, x.topk(5).indices)


def test_cpu_ops_build_is_shared_by_checkouts_with_the_same_sources(tmp_path, monkeypatch):
    """Two checkouts (other paths, other mtimes) with the same kernels/csrc: one library name, and
    sources staged in the build folder, so the build's command lines, which ninja compares, are
    the same from both and neither rebuilds over the other's. Other sources: another name."""
    import shutil

    from kernels.shared_builds import stage

    checkouts = [shutil.copytree(cpu_ops.SOURCES[0].parent, tmp_path / f"checkout{i}" / "csrc") for i in (0, 1)]
    names = []
    for csrc in checkouts:
        monkeypatch.setattr(cpu_ops, "SOURCES", sorted(csrc.glob("*.cpp")))
        names.append(cpu_ops._library_name())
        staged = stage(cpu_ops._build_inputs(), tmp_path / "build" / names[-1])
        assert staged == tmp_path / "build" / names[0] / "src"
        assert [(staged / s.name).read_bytes() for s in cpu_ops.SOURCES] == [s.read_bytes() for s in cpu_ops.SOURCES]
    assert names[0] == names[1]
    with open(checkouts[1] / cpu_ops.SOURCES[0].name, "a") as f:
        f.write("// changed\n")
    assert cpu_ops._library_name() != names[0]


def test_staging_the_sources_leaves_another_hosts_copy_in_progress_alone(tmp_path):
    """TORCH_EXTENSIONS_DIR shared by the nodes of a job: each node's first rank stages the sources.
    The temporary was `.<source>.<pid>.tmp`, and pids repeat across nodes (containers start at the
    same ones): one node truncated and renamed away the file the other was writing, whose rename
    then failed (or published a half-written source). Now each writer has its own temporary."""
    build = tmp_path / "build"
    (build / "src").mkdir(parents=True)
    source = cpu_ops.SOURCES[0]
    others = build / "src" / f".{source.name}.{os.getpid()}.tmp"  # the other node's, same pid
    others.write_bytes(b"// half written by another node")
    from kernels.shared_builds import stage

    staged = stage(cpu_ops._build_inputs(), build)
    assert others.read_bytes() == b"// half written by another node"
    assert [(staged / s.name).read_bytes() for s in cpu_ops.SOURCES] == [s.read_bytes() for s in cpu_ops.SOURCES]
    assert sorted(p.name for p in (build / "src").iterdir()) == sorted(
        [others.name, *(s.name for s in cpu_ops.SOURCES)]
    )


@pytest.mark.parametrize("value_grad", ["sorted", "atomic", "sparse"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("via_ops", [False, True])
def test_empty_batch_gives_empty_outputs_and_zero_gradients(backend, value_grad, via_ops, device):
    """T = 0 tokens (an empty batch or shard): the search and the bag return (0, H, k) and
    (0, d), and the backward gives a zero value table gradient and empty weight/query gradients."""
    H, n, half, k, d = 2, 8, 4, 3, 6
    q = torch.randn(0, H, 2 * half, device=device, requires_grad=True)
    k1, k2 = (torch.randn(H, n, half, device=device, requires_grad=True) for _ in range(2))
    values = torch.randn(n * n, d, device=device, requires_grad=True)
    kern = ops if via_ops else __import__("kernels")
    w, idx = kern.pkm_topk(q, k1, k2, k, backend=backend)
    assert w.shape == idx.shape == (0, H, k)
    out = kern.embedding_bag(values, idx, w, backend=backend, value_grad=value_grad)
    assert out.shape == (0, d) and out.dtype == values.dtype
    dq, dk1, dk2, dv = torch.autograd.grad(out.sum(), (q, k1, k2, values), allow_unused=True)
    assert dv is not None and dv.shape == values.shape and not dv.to_dense().any()
    for grad, leaf in ((dq, q), (dk1, k1), (dk2, k2)):
        assert grad is None or (grad.shape == leaf.shape and not grad.any())
    w_leaf = torch.zeros(0, H, k, device=device, requires_grad=True)
    (dw,) = torch.autograd.grad(kern.embedding_bag(values, idx, w_leaf, backend=backend).sum(), w_leaf)
    assert dw.shape == (0, H, k)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_fakes_match_the_kernels_for_strided_inputs(backend, device):
    """The backward ops' fake kernels describe what the kernels return: contiguous
    gradients, also for a transposed query / keys / weights and a column slice of the
    values (a fake copying the input's strides broke inductor's compiled backward)."""
    T, H, n, half, k, d = 5, 2, 6, 4, 3, 7
    q = torch.randn(H, T, 2 * half, device=device).transpose(0, 1)
    k1, k2 = (torch.randn(H, half, n, device=device).transpose(1, 2) for _ in range(2))
    w, idx = ops.pkm_topk(q, k1, k2, k, backend)
    g = torch.randn(w.shape, device=device)
    torch.library.opcheck(
        torch.ops.memlayers.pkm_topk_backward,
        (g, q, k1, k2, w, idx, k, backend),
        test_utils=("test_schema", "test_faketensor"),
    )
    values = torch.randn(n * n, d + 3, device=device)[:, 2 : 2 + d]  # unit column stride, as Triton needs
    weights = torch.randn(H, k, T, device=device).permute(2, 0, 1)
    for need_values, need_weights in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(
            torch.ops.memlayers.embedding_bag_backward,
            (torch.randn(T, d, device=device), values, idx, weights, backend, "sorted", need_values, need_weights),
            test_utils=("test_schema", "test_faketensor"),
        )
    if backend == "torch":  # the reference bag also takes a transposed value table
        torch.library.opcheck(
            torch.ops.memlayers.embedding_bag_backward,
            (
                torch.randn(T, d, device=device),
                values.t().contiguous().t(),
                idx,
                weights,
                backend,
                "sorted",
                True,
                True,
            ),
            test_utils=("test_schema", "test_faketensor"),
        )


def test_torch_backend_scores_bf16_inputs_in_fp32():
    """bf16 query and keys at the memory layer's scale (RMS-normed, |score| up to ~70): the
    torch backend scores in fp32, as the Triton kernel accumulates, so it selects float64's
    top-k slots (the k-th and (k+1)-th float64 scores lie > 1e-3 apart, 100x the fp32 scoring
    error) and its weights are float64's softmax up to bf16 output rounding (2**-8 relative)
    and the fp32 score error (< 1e-4 in a score: < 1e-4 relative in a weight). Scored in
    bf16, 14% of the slots differed and weights were 37% off."""
    g = torch.Generator().manual_seed(0)
    T, H, n, half, k = 16, 2, 64, 128, 32
    q = F.rms_norm(torch.randn(T, H, 2, half, generator=g), (half,)).flatten(-2).bfloat16()
    k1, k2 = (F.rms_norm(torch.randn(H, n, half, generator=g), (half,)).bfloat16() for _ in range(2))
    s1 = torch.einsum("thd,hnd->thn", q[..., :half].double(), k1.double())
    s2 = torch.einsum("thd,hnd->thn", q[..., half:].double(), k2.double())
    full = (s1[..., :, None] + s2[..., None, :]).flatten(-2)  # (T, H, n*n) float64 scores
    top = full.topk(k + 1, dim=-1)
    assert (top.values[..., k - 1] - top.values[..., k]).min() > 1e-3  # the test's premise
    scores, idx = reference.pkm_scores_topk(q, k1, k2, k)
    assert scores.dtype == torch.float32
    assert (scores.double() - full.gather(-1, idx)).abs().max() < 1e-4
    for w, idx in (reference.pkm_topk(q, k1, k2, k), ops.pkm_topk(q, k1, k2, k, "torch")):
        assert w.dtype == torch.bfloat16
        assert torch.equal(idx.sort(-1).values, top.indices[..., :k].sort(-1).values)
        torch.testing.assert_close(w.double(), full.gather(-1, idx).softmax(-1), rtol=2**-8 + 1e-4, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("via_ops", [False, True])
def test_bf16_scoring_gradients_cancel_a_common_weight_gradient(backend, via_ops, device):
    """bf16 query and keys with dL/dw = 10 + 0.1 * noise: the part common to the k slots
    cancels in ds = w * (g - sum(g * w)) only for weights summing to 1. The custom op saves
    its fp32 weights (the cast to bf16 is outside it), so its dquery / dkeys match float64
    gradients at the same selected slots within BF16_TOL (about one bf16 ulp of the largest
    gradient), as the autograd paths that keep fp32 weights do. With the op's bf16-rounded
    weights saved the error was 0.3-0.5 of the largest gradient."""
    g = torch.Generator().manual_seed(0)
    T, H, n, half, k = 32, 2, 8, 8, 8
    leaves = [torch.randn(shape, generator=g).bfloat16() for shape in ((T, H, 2 * half), (H, n, half), (H, n, half))]
    grad_w = (10 + 0.1 * torch.randn(T, H, k, generator=g)).bfloat16()
    inputs = [t.to(device).requires_grad_() for t in leaves]
    topk = ops.pkm_topk if via_ops else __import__("kernels").pkm_topk
    w, idx = topk(*inputs, k, backend=backend)
    assert w.dtype == torch.bfloat16
    got = torch.autograd.grad(w, inputs, grad_w.to(device))
    exact = [t.double().requires_grad_() for t in leaves]
    idx = idx.cpu()
    s1 = torch.einsum("thd,hnd->thn", exact[0][..., :half], exact[1]).gather(-1, idx // n)
    s2 = torch.einsum("thd,hnd->thn", exact[0][..., half:], exact[2]).gather(-1, idx % n)
    want = torch.autograd.grad((s1 + s2).softmax(-1), exact, grad_w.double())
    for name, a, b in zip(("dquery", "dkeys1", "dkeys2"), got, want):
        assert_close(a, b, BF16_TOL, f"{name} ({backend}, via_ops={via_ops})")
    if via_ops:
        torch.library.opcheck(torch.ops.memlayers.pkm_topk, (*inputs, k, backend))  # fp32 weights, fake included


def test_scoring_baseline_scores_in_the_inputs_dtype():
    """The benchmarks' PyTorch scoring baseline is the reference search with scores in the inputs'
    dtype: fp32 inputs give the reference's result exactly; bf16 inputs give bf16 scores, each
    within bf16 rounding of the float64 score of the slot it names."""
    from kernels import benchmark as kb

    g = torch.Generator().manual_seed(3)
    q, k1, k2 = (torch.randn(*shape, generator=g) for shape in ((24, 2, 16), (2, 12, 8), (2, 12, 8)))
    for got, want in zip(kb.scoring_baseline(q, k1, k2, 5), reference.pkm_topk(q, k1, k2, 5)):
        assert torch.equal(got, want)
    qb, k1b, k2b = (x.bfloat16() for x in (q, k1, k2))
    scores, indices = reference.pkm_scores_topk(qb, k1b, k2b, 5, score_dtype=torch.bfloat16)
    assert scores.dtype == torch.bfloat16
    heads = torch.arange(2)[None, :, None]
    exact = torch.einsum("thd,thkd->thk", qb[..., :8].double(), k1b.double()[heads, indices // 12]) + torch.einsum(
        "thd,thkd->thk", qb[..., 8:].double(), k2b.double()[heads, indices % 12]
    )
    # two roundings of the half scores and one of their sum, each at most half a bf16 ulp (2^-8 relative)
    assert ((scores.double() - exact).abs() <= 3 * 2**-8 * exact.abs().clamp_min(1.0)).all()
    weights, _ = kb.scoring_baseline(qb, k1b, k2b, 5)
    assert torch.equal(weights, scores.softmax(dim=-1).to(torch.bfloat16))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_compiled_block_reads_sparse_value_gradients_as_eager_does(backend, device, make_model_config):
    """The sparse value optimizers' read (value_grad="sparse", no custom op) inside blocks compiled
    by train.compile's apply_compile: the same loss and gradients as eager, the value table's as a
    sparse tensor. On the Triton path dynamo traced into the bag's launches (interpreted: an
    InterpreterError at the first forward) until apply_compile kept that bag eager."""
    import copy

    from pretrain.model.objective import language_model_loss
    from pretrain.model.transformer import Transformer
    from pretrain.parallel import init_memory_groups
    from pretrain.parallel.compile import apply_compile
    from pretrain.parallel.values import parallelize_memory

    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = Transformer(make_model_config(memory=dict(kernel=backend), n_layers=2)).to(device)
    parallelize_memory(eager, init_memory_groups(1), kernel=backend, device=device, value_grad="sparse")
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, backend="aot_eager")  # dynamo and AOTAutograd; inductor adds nothing here
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1)).to(device)
    want, got = (_loss_and_accumulated_grads(m, tokens, language_model_loss) for m in (eager, compiled))
    value_grads = [name for name, grad in got.items() if grad.is_sparse]
    assert value_grads == [name for name, grad in want.items() if grad.is_sparse] == ["values.0.shard"]
    for name, grad in want.items():
        assert_close(got[name].to_dense(), grad.to_dense(), FP32_TOL, name)


def _loss_and_accumulated_grads(model, tokens, loss_fn) -> dict:
    """`_loss_and_grads` by backward(): a sparse value shard's gradient is added into shard.grad
    lookup by lookup (pretrain/parallel/held_rows.py), which torch.autograd.grad does not see."""
    params = dict(model.named_parameters())
    params |= {f"values.{i}.shard": table.shard for i, table in enumerate(model.values)}
    for p in params.values():
        p.grad = None
    loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    return {"loss": loss.detach(), **{name: p.grad for name, p in params.items()}}


def _loss_and_grads(model, tokens, loss_fn) -> dict:
    """{"loss": the loss, each parameter's name: its gradient}, the value shards' included (they are
    held outside the module's parameters)."""
    params = dict(model.named_parameters())
    params |= {f"values.{i}.shard": table.shard for i, table in enumerate(model.values)}
    loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
    return {"loss": loss.detach(), **dict(zip(params, torch.autograd.grad(loss, list(params.values()))))}
