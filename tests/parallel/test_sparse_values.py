"""Row-sparse value gradients and lazy Adam (optim.value_optimizer=sparse_adamw), one process.

References: a float64 lazy Adam written here from its definition, the dense path's
gradients (adamw), and the trainer's own straight run for resume.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import kernels
from parallel_helpers import OPTIM, rel_err, tiny_cfg
from pretrain.model.config import ConfigError
from pretrain.model.objective import language_model_loss
from pretrain.model.transformer import Transformer
from pretrain.parallel import MemoryParallel, init_memory_groups
from pretrain.parallel.activation_checkpointing import apply_activation_checkpointing
from pretrain.parallel.sparse_adamw import SparseAdamW

SPARSE = dataclasses.replace(OPTIM, value_optimizer="sparse_adamw")
ROWWISE = dataclasses.replace(OPTIM, value_optimizer="sparse_rowwise_adamw")


def lazy_adam_float64(weight, exp_avg, exp_avg_sq, rows, grad_rows, t, lr, betas, eps):
    """One lazy Adam step in float64 on the (unique) rows; global step t for bias correction."""
    b1, b2 = betas
    m = b1 * exp_avg[rows] + (1 - b1) * grad_rows
    v = b2 * exp_avg_sq[rows] + (1 - b2) * grad_rows**2
    exp_avg[rows], exp_avg_sq[rows] = m, v
    weight[rows] -= lr / (1 - b1**t) * m / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)


def test_bag_sparse_gradient_equals_dense_with_duplicate_rows():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(40, 12, generator=gen, requires_grad=True)
    indices = torch.randint(0, 9, (7, 2, 5), generator=gen)  # 70 entries over 9 rows: many repeats
    indices[0, 0, :] = 4  # one token reading the same row in every slot
    weights = torch.rand(7, 2, 5, generator=gen, requires_grad=True)
    grad_out = torch.randn(7, 12, generator=gen)
    kernels.embedding_bag(values, indices, weights, backend="torch").backward(grad_out)
    dense_v, dense_w = values.grad, weights.grad
    values.grad = weights.grad = None
    kernels.embedding_bag(values, indices, weights, backend="torch", value_grad="sparse").backward(grad_out)
    sparse = values.grad.coalesce()
    rows = sparse.indices()[0]
    assert torch.equal(rows, indices.unique())  # exactly the rows read, once each
    assert torch.equal(dense_v.abs().sum(1).nonzero().squeeze(1), rows)
    torch.testing.assert_close(sparse.values(), dense_v[rows], rtol=0, atol=1e-6)
    assert torch.equal(weights.grad, dense_w)  # the same dot products, taken in row order


def test_sparse_adamw_three_steps_equal_float64_lazy_adam():
    gen = torch.Generator().manual_seed(0)
    N, width, lr, betas, eps = 50, 6, 1e-2, (0.9, 0.95), 1e-8
    p = torch.nn.Parameter(torch.randn(N, width, generator=gen))
    opt = SparseAdamW([p], lr=lr, betas=betas, eps=eps)
    ref_w, ref_m, ref_v = p.detach().double().clone(), torch.zeros(N, width, dtype=torch.float64), None
    ref_v = torch.zeros_like(ref_m)
    touched = torch.zeros(N, dtype=torch.bool)
    for t in (1, 2, 3):
        before = {"w": p.detach().clone()}
        if opt.state:
            before.update(m=opt.state[p]["exp_avg"].clone(), v=opt.state[p]["exp_avg_sq"].clone())
        rows = torch.randint(0, 20, (30,), generator=gen)  # uncoalesced, with repeats; rows >= 20 never read
        grads = torch.randn(30, width, generator=gen)
        p.grad = torch.sparse_coo_tensor(rows[None], grads, (N, width), check_invariants=True)
        opt.step()
        unique = rows.unique()
        summed = torch.zeros(N, width, dtype=torch.float64).index_add_(0, rows, grads.double())[unique]
        lazy_adam_float64(ref_w, ref_m, ref_v, unique, summed, t, lr, betas, eps)
        touched[unique] = True
        unread = torch.ones(N, dtype=torch.bool)
        unread[unique] = False
        st = opt.state[p]
        assert torch.equal(p.detach()[unread], before["w"][unread])  # bitwise
        if "m" in before:
            assert torch.equal(st["exp_avg"][unread], before["m"][unread])
            assert torch.equal(st["exp_avg_sq"][unread], before["v"][unread])
        assert float(st["step"]) == t
    st = opt.state[p]
    torch.testing.assert_close(p.detach().double(), ref_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(st["exp_avg"].double(), ref_m, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(st["exp_avg_sq"].double(), ref_v, rtol=1e-5, atol=1e-12)
    assert not st["exp_avg"][~touched].any() and not st["exp_avg_sq"][~touched].any()


def rowwise_lazy_adam_float64(weight, exp_avg, exp_avg_sq_row, rows, grad_rows, t, lr, betas, eps):
    """One lazy Adam step with one second moment per row, fed the row's mean g^2 (float64)."""
    b1, b2 = betas
    m = b1 * exp_avg[rows] + (1 - b1) * grad_rows
    v = b2 * exp_avg_sq_row[rows] + (1 - b2) * grad_rows.pow(2).mean(1)
    exp_avg[rows], exp_avg_sq_row[rows] = m, v
    weight[rows] -= lr / (1 - b1**t) * m / ((v / (1 - b2**t)).sqrt() + eps)[:, None]


def test_rowwise_three_steps_equal_float64_and_unread_rows_keep_their_bits():
    gen = torch.Generator().manual_seed(2)
    N, width, lr, betas, eps = 50, 6, 1e-2, (0.9, 0.95), 1e-8
    p = torch.nn.Parameter(torch.randn(N, width, generator=gen))
    opt = SparseAdamW([p], lr=lr, betas=betas, eps=eps, second_moment="row")
    ref_w, ref_m, ref_v = p.detach().double().clone(), torch.zeros(N, width, dtype=torch.float64), None
    ref_v = torch.zeros(N, dtype=torch.float64)
    for t in (1, 2, 3):
        before = [p.detach().clone(), *(opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq_row") if opt.state)]
        rows = torch.randint(0, 20, (30,), generator=gen)
        grads = torch.randn(30, width, generator=gen)
        p.grad = torch.sparse_coo_tensor(rows[None], grads, (N, width), check_invariants=True)
        opt.step()
        unique = rows.unique()
        summed = torch.zeros(N, width, dtype=torch.float64).index_add_(0, rows, grads.double())[unique]
        rowwise_lazy_adam_float64(ref_w, ref_m, ref_v, unique, summed, t, lr, betas, eps)
        unread = torch.ones(N, dtype=torch.bool)
        unread[unique] = False
        st = opt.state[p]
        assert st["exp_avg_sq_row"].shape == (N,) and "exp_avg_sq" not in st  # N floats, not N x width
        for now, then in zip((p.detach(), st["exp_avg"], st["exp_avg_sq_row"]), before):
            assert torch.equal(now[unread], then[unread])  # bitwise
    st = opt.state[p]
    torch.testing.assert_close(p.detach().double(), ref_w, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(st["exp_avg"].double(), ref_m, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(st["exp_avg_sq_row"].double(), ref_v, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("second_moment", ["element", "row"])
def test_bfloat16_first_moment_equals_float64_with_rounded_storage(second_moment):
    """m stored in bfloat16: the float64 reference updates with m, then stores it rounded."""
    gen = torch.Generator().manual_seed(4)
    N, width, lr, betas, eps = 50, 6, 1e-2, (0.9, 0.95), 1e-8
    p = torch.nn.Parameter(torch.randn(N, width, generator=gen))
    opt = SparseAdamW([p], lr=lr, betas=betas, eps=eps, second_moment=second_moment, momentum_dtype=torch.bfloat16)
    w, m = p.detach().double().clone(), torch.zeros(N, width, dtype=torch.float64)
    v = torch.zeros(N, dtype=torch.float64) if second_moment == "row" else torch.zeros(N, width, dtype=torch.float64)
    for t in (1, 2, 3):
        rows = torch.randint(0, 20, (30,), generator=gen)
        grads = torch.randn(30, width, generator=gen)
        p.grad = torch.sparse_coo_tensor(rows[None], grads, (N, width), check_invariants=True)
        opt.step()
        u = rows.unique()
        g = torch.zeros(N, width, dtype=torch.float64).index_add_(0, rows, grads.double())[u]
        b1, b2 = betas
        m_step = b1 * m[u] + (1 - b1) * g  # this step's update uses m before rounding
        m[u] = m_step.to(torch.bfloat16).double()  # and stores it rounded
        if second_moment == "row":
            v[u] = b2 * v[u] + (1 - b2) * g.pow(2).mean(1)
            denom = (v[u] / (1 - b2**t)).sqrt()[:, None] + eps
        else:
            v[u] = b2 * v[u] + (1 - b2) * g**2
            denom = v[u].sqrt() / (1 - b2**t) ** 0.5 + eps
        w[u] -= lr / (1 - b1**t) * m_step / denom
    st = opt.state[p]
    assert st["exp_avg"].dtype == torch.bfloat16 and p.dtype == torch.float32
    assert torch.equal(st["exp_avg"].double(), m)  # the same bfloat16 values
    torch.testing.assert_close(p.detach().double(), w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("momentum_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [5, 64])
def test_compiled_rowwise_update_matches_the_torch_ops(monkeypatch, momentum_dtype, width, cpu_ops_built):
    """The CPU path's one-pass update (kernels/csrc/rowwise_adam.cpp) and the blocked gathers and
    scatters of torch ops (the accelerator path) over 3 steps: the moments bitwise (the same roundings,
    fma where torch's kernels fuse), the values within fp32 rounding. The values may differ in the last
    bits because torch's vectorised CPU sqrt is not correctly rounded (sqrt(2.463887929916382) gives
    1.5696775913, IEEE 1.5696777105), and the op's is."""
    from kernels import cpu_ops

    gen = torch.Generator().manual_seed(width)
    init = torch.randn(300, width, generator=gen)
    steps = [(torch.randint(0, 300, (200,), generator=gen), torch.randn(200, width, generator=gen)) for _ in range(3)]
    compiled_calls = []
    real = cpu_ops.rowwise_adam_
    finals = []
    for compiled in (True, False):
        monkeypatch.setattr(
            cpu_ops, "rowwise_adam_", lambda *a, on=compiled: on and compiled_calls.append(1) is None and real(*a)
        )
        p = torch.nn.Parameter(init.clone())
        opt = SparseAdamW([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, second_moment="row", momentum_dtype=momentum_dtype)
        for rows, grads in steps:
            p.grad = torch.sparse_coo_tensor(rows[None], grads, (300, width), check_invariants=True)
            opt.step()
        finals.append([p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq_row"].clone()])
    assert len(compiled_calls) == 3
    (x_op, m_op, v_op), (x_torch, m_torch, v_torch) = finals
    assert torch.equal(m_op, m_torch) and torch.equal(v_op, v_torch)
    torch.testing.assert_close(x_op, x_torch, rtol=1e-6, atol=1e-7)
    assert not torch.equal(x_op, init)


@pytest.mark.parametrize("second_moment", ["element", "row"])
def test_blocked_row_update_equals_one_block(monkeypatch, second_moment):
    """The bounded-temporary blocks change nothing: 64 rows at a time == all rows at once, bitwise
    (the torch-ops path: the CPU's compiled row-wise update is switched off)."""
    from kernels import cpu_ops
    from pretrain.parallel import sparse_adamw

    monkeypatch.setattr(cpu_ops, "rowwise_adam_", lambda *a: False)

    gen = torch.Generator().manual_seed(3)
    init = torch.randn(400, 5, generator=gen)
    steps = [(torch.randint(0, 400, (300,), generator=gen), torch.randn(300, 5, generator=gen)) for _ in range(3)]
    finals = []
    for block_elements in (1 << 20, 64 * 5):
        monkeypatch.setattr(sparse_adamw, "ROW_BLOCK_ELEMENTS", block_elements)
        assert sparse_adamw.row_block(5) == (64 if block_elements == 64 * 5 else 209664)  # ~200 rows read: 4 blocks
        assert sparse_adamw.row_block(5, "meta") == sparse_adamw.ACCELERATOR_ROW_BLOCK_ELEMENTS // 5 // 64 * 64
        p = torch.nn.Parameter(init.clone())
        opt = SparseAdamW([p], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, second_moment=second_moment)
        for rows, grads in steps:
            p.grad = torch.sparse_coo_tensor(rows[None], grads, (400, 5), check_invariants=True)
            opt.step()
        finals.append([p.detach().clone(), *(v for k, v in opt.state[p].items() if k != "step")])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_row_read_every_step_gets_dense_adamw_update():
    gen = torch.Generator().manual_seed(1)
    a = torch.nn.Parameter(torch.randn(8, 4, generator=gen))
    b = torch.nn.Parameter(a.detach().clone())
    # fused=True as value_optimizer=adamw builds it (memory_parallel.py): torch's default (foreach)
    # kernel rounds differently by an ulp on some CPUs (seen on AVX-512)
    dense = torch.optim.AdamW([a], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    sparse = SparseAdamW([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(3):
        g = torch.randn(8, 4, generator=gen)
        a.grad, b.grad = g.clone(), g.to_sparse(sparse_dim=1)
        dense.step(), sparse.step()
    assert torch.equal(b.detach(), a.detach())  # the same fused kernel, row by row


def micro_batches(n: int = 2, seed: int = 4) -> torch.Tensor:
    return torch.randint(0, 64, (n, 2, 9), generator=torch.Generator().manual_seed(seed))


def accumulated_gradients(cfg, optim, data):
    """MemoryParallel's value gradients after backward of every micro-batch and reduce_gradients."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    mp = MemoryParallel(model, init_memory_groups(1), optim, kernel="torch")
    for tokens in data:
        language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    mp.reduce_gradients()
    return mp


def trained_values(cfg, optim, data):
    """MemoryParallel after one full value step (zero_grad, backward, reduce, clip at 1, step) per micro-batch."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    mp = MemoryParallel(model, init_memory_groups(1), optim, kernel="torch")
    for tokens in data:
        mp.zero_grad()
        language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        mp.reduce_gradients(), mp.clip_grad_norm(1.0), mp.step(1.0)
    return mp


@pytest.mark.parametrize("shared", [False, True])
def test_sparse_gradients_equal_dense_nonzero_rows_with_accumulation(shared):
    cfg, data = tiny_cfg(shared=shared), micro_batches()
    dense, sparse = accumulated_gradients(cfg, OPTIM, data), accumulated_gradients(cfg, SPARSE, data)
    assert len(sparse.parameters()) == (1 if shared else 2)
    for p, q in zip(dense.parameters(), sparse.parameters()):
        assert q.grad.is_sparse and q.grad.is_coalesced()
        rows = q.grad._indices()[0]
        assert torch.equal(rows, p.grad.abs().sum(1).nonzero().squeeze(1))  # the same row set
        torch.testing.assert_close(q.grad._values(), p.grad[rows], rtol=0, atol=1e-6)
        assert sparse.grad_bytes() < dense.grad_bytes()
    torch.testing.assert_close(sparse.clip_grad_norm(0.0), dense.clip_grad_norm(0.0), rtol=1e-6, atol=0)


def read_rows(model) -> list[torch.Tensor]:
    return [layer.last_indices.reshape(-1) for layer in model.memory_layers()]


@pytest.fixture
def concatenating_sparse_add(monkeypatch):
    """torch's CUDA sparse add on the CPU: it concatenates the operands' entries (add_out_sparse_cuda
    never merges), while the CPU's merges two sorted operands, unless an operand's values are not
    contiguous (add_out_sparse_non_contiguous concatenates). The bag's gradient rows are handed over
    column-major, so that every add autograd does on them concatenates, as on a GPU."""
    segment_sum = kernels.reference.sorted_segment_sum

    def column_major(*args, **kwargs):
        rows, grad_rows = segment_sum(*args, **kwargs)
        return rows, grad_rows.t().contiguous().t()

    monkeypatch.setattr(kernels.reference, "sorted_segment_sum", column_major)
    leaf = torch.zeros(64, 4, requires_grad=True)  # the emulation works: two lookups of a plain leaf concatenate
    idx, w = torch.randint(0, 64, (9, 2, 4), generator=torch.Generator().manual_seed(0)), torch.rand(9, 2, 4)
    (kernels.embedding_bag(leaf, idx, w, value_grad="sparse").sum() * 2).backward()
    (kernels.embedding_bag(leaf, idx, w, value_grad="sparse").sum()).backward()
    assert leaf.grad._nnz() == 2 * idx.unique().numel()


def shared_table_gradients(data, checkpointing: str = "none") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(rows held, their gradient) of a table read by two memory layers after each micro-batch's
    backward, each checked to be the distinct rows read so far."""
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(shared=True))
    mp = MemoryParallel(model, init_memory_groups(1), SPARSE, kernel="torch")
    apply_activation_checkpointing(model, checkpointing)
    (p,) = mp.parameters()
    read, held = [], []
    for tokens in data:
        language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        read += read_rows(model)
        assert torch.equal(p.grad._indices()[0].sort().values, torch.cat(read).unique())  # each row read, once
        held.append((p.grad._indices()[0].clone(), p.grad._values().clone()))
    return held


def rereading_micro_batches() -> torch.Tensor:
    """Three micro-batches, the third reading the first's rows again (added in place)."""
    data = micro_batches(2, seed=5)
    return torch.cat([data, data[:1]])


@pytest.mark.parametrize("micro_batch_count", [1, 3])
def test_shared_table_gradient_holds_each_row_read_once_after_every_micro_batch(
    concatenating_sparse_add, micro_batch_count
):
    """Two memory layers on one table, accumulated over micro-batches with autograd's sparse add
    concatenating as on CUDA: after each backward the shard's gradient holds the distinct rows read so
    far, each once (before, it held every lookup's rows: 2 lookups per micro-batch), equal to the dense
    path's gradient and bitwise the same in a second run."""
    data = rereading_micro_batches()[:micro_batch_count]
    held = shared_table_gradients(data)
    rows, grads = held[-1]
    (dense,) = accumulated_gradients(tiny_cfg(shared=True), OPTIM, data).parameters()
    torch.testing.assert_close(grads, dense.grad[rows], rtol=0, atol=1e-6)
    for (r1, g1), (r2, g2) in zip(shared_table_gradients(data), held):
        assert torch.equal(r1, r2) and torch.equal(g1, g2)


@pytest.mark.parametrize("checkpointing", ["full", "memory"])
def test_checkpointed_shared_table_gradient_adds_each_lookup_once(concatenating_sparse_add, checkpointing):
    """A recomputed forward reads the table again but adds no gradient: the same bits as without."""
    data = rereading_micro_batches()
    for (r1, g1), (r2, g2) in zip(shared_table_gradients(data, checkpointing), shared_table_gradients(data)):
        assert torch.equal(r1, r2) and torch.equal(g1, g2)


def test_values_after_three_steps_equal_float64_lazy_adam_and_unread_rows_keep_their_bits():
    """Values-only training (dense weights fixed) with global-norm clipping, against float64."""
    cfg = tiny_cfg(shared=True)  # one table read by two memory layers
    data = micro_batches(3, seed=6)
    torch.manual_seed(0)
    model = Transformer(cfg)
    mp = MemoryParallel(model, init_memory_groups(1), SPARSE, kernel="torch")
    init = [p.detach().clone() for p in mp.parameters()]
    torch.manual_seed(0)
    ref = Transformer(cfg).double()
    ref_table = ref.values[0].weight
    with torch.no_grad():
        ref_table.copy_(init[0].double())
    m, v = torch.zeros_like(ref_table, dtype=torch.float64), torch.zeros_like(ref_table, dtype=torch.float64)
    ever = torch.zeros(cfg.memory.num_slots, dtype=torch.bool)
    for t, tokens in enumerate(data, start=1):
        mp.zero_grad()
        language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        mp.reduce_gradients()
        norm = mp.clip_grad_norm(SPARSE.grad_clip)
        mp.step(1.0)
        ref_table.grad = None
        language_model_loss(ref(tokens[:, :-1]), tokens[:, 1:]).backward()
        rows = torch.cat(read_rows(ref)).unique()
        ever[rows] = True
        g = ref_table.grad[rows]
        ref_norm = ref_table.grad.norm()
        assert norm.item() == pytest.approx(ref_norm.item(), rel=1e-5)
        g = g * min(1.0, SPARSE.grad_clip / (ref_norm.item() + 1e-6))
        with torch.no_grad():
            lazy_adam_float64(ref_table, m, v, rows, g, t, SPARSE.value_lr, (SPARSE.beta1, SPARSE.beta2), SPARSE.eps)
    (p,) = mp.parameters()
    st = mp.optimizer.state[p]
    assert 0 < ever.sum() < cfg.memory.num_slots
    assert rel_err(p.detach()[ever], ref_table.detach()[ever]) < 1e-5
    assert rel_err(st["exp_avg"][ever], m[ever]) < 1e-4
    assert torch.equal(p.detach()[~ever], init[0][~ever])
    assert not st["exp_avg"][~ever].any() and not st["exp_avg_sq"][~ever].any()


def test_sparse_checkpoint_round_trip_and_interchangeable_state(tmp_path):
    cfg, data = tiny_cfg(), micro_batches(2, seed=8)
    mp = trained_values(cfg, SPARSE, data)
    mp.save(tmp_path)
    for optim in (SPARSE, OPTIM):  # a sparse checkpoint loads into either optimizer
        torch.manual_seed(0)
        other = MemoryParallel(Transformer(cfg), init_memory_groups(1), optim, kernel="torch")
        other.load(tmp_path)
        for p, q in zip(mp.parameters(), other.parameters()):
            s, t = mp.optimizer.state[p], other.optimizer.state[q]
            assert torch.equal(p, q) and torch.equal(s["exp_avg"], t["exp_avg"])
            assert torch.equal(s["exp_avg_sq"], t["exp_avg_sq"]) and float(s["step"]) == float(t["step"]) == 2


def test_rowwise_checkpoint_round_trip_and_refused_by_elementwise_optimizers(tmp_path):
    from pretrain.parallel.shard_files import ShardFileError

    cfg, data = tiny_cfg(), micro_batches(2, seed=8)
    mp = trained_values(cfg, ROWWISE, data)
    state_bytes = mp.accounting()["optimizer_state_bytes"]
    assert state_bytes == sum(p.numel() * 4 + p.shape[0] * 4 + 4 for p in mp.parameters())  # N d + N + step
    (tmp_path / "row").mkdir()
    mp.save(tmp_path / "row")
    torch.manual_seed(0)
    other = MemoryParallel(Transformer(cfg), init_memory_groups(1), ROWWISE, kernel="torch")
    other.load(tmp_path / "row")
    for p, q in zip(mp.parameters(), other.parameters()):
        s, t = mp.optimizer.state[p], other.optimizer.state[q]
        assert torch.equal(p, q) and torch.equal(s["exp_avg"], t["exp_avg"])
        assert torch.equal(s["exp_avg_sq_row"], t["exp_avg_sq_row"]) and float(t["step"]) == 2
    for optim in (SPARSE, OPTIM):  # the element-wise optimizers cannot use a row moment
        elementwise = MemoryParallel(Transformer(cfg), init_memory_groups(1), optim, kernel="torch")
        with pytest.raises(ShardFileError, match="no exp_avg_sq: it holds a row-wise second moment"):
            elementwise.load(tmp_path / "row")
    elementwise.save(tmp_path / "element")
    elementwise.optimizer.state[elementwise.parameters()[0]] = {}  # saved with step 0: make it load moments
    for p in elementwise.parameters():
        p.grad = torch.zeros_like(p)
    elementwise.step(1.0)
    elementwise.save(tmp_path / "element")
    with pytest.raises(ShardFileError, match="no exp_avg_sq_row: it holds an element-wise second moment"):
        other.load(tmp_path / "element")


def test_bfloat16_momentum_checkpoint_round_trip_and_fp32_checkpoint_loads_rounded(tmp_path):
    from safetensors import safe_open

    bf16 = dataclasses.replace(ROWWISE, value_momentum_dtype="bfloat16")
    cfg, data = tiny_cfg(shared=True), micro_batches(2, seed=8)  # one table: one shard file
    runs = {}
    for name, optim in (("fp32", ROWWISE), ("bf16", bf16)):
        mp = trained_values(cfg, optim, data)
        (path,) = mp.save(tmp_path / name)
        runs[name] = mp
    with safe_open(str(path), framework="pt") as f:
        assert f.get_slice("exp_avg").get_dtype() == "BF16" and f.get_slice("weight").get_dtype() == "F32"
    assert (
        runs["bf16"].accounting()["optimizer_state_bytes"] < 0.75 * runs["fp32"].accounting()["optimizer_state_bytes"]
    )
    for src in ("bf16", "fp32"):  # either checkpoint loads into a bfloat16-momentum optimizer
        torch.manual_seed(0)
        other = MemoryParallel(Transformer(cfg), init_memory_groups(1), bf16, kernel="torch")
        other.load(tmp_path / src)
        (p,), (q,) = runs[src].parameters(), other.parameters()
        m_saved, m_loaded = runs[src].optimizer.state[p]["exp_avg"], other.optimizer.state[q]["exp_avg"]
        assert torch.equal(p, q) and m_loaded.dtype == torch.bfloat16
        assert torch.equal(m_loaded, m_saved.to(torch.bfloat16))  # bitwise, or rounded from fp32


def test_bfloat16_momentum_with_dense_adamw_is_refused():
    from pathlib import Path

    from pretrain.config import load_config

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    with pytest.raises(ConfigError, match="optim.value_momentum_dtype=bfloat16 needs a sparse value optimizer"):
        load_config(tiny, ["optim.value_momentum_dtype=bfloat16"])
    cfg = load_config(tiny, ["optim.value_momentum_dtype=bfloat16", "optim.value_optimizer=sparse_adamw"])
    assert cfg.optim.value_momentum_dtype == "bfloat16"


def test_unknown_value_optimizer_is_refused():
    with pytest.raises(ConfigError, match="optim.value_optimizer='sgd'"):
        MemoryParallel(
            Transformer(tiny_cfg()), init_memory_groups(1), dataclasses.replace(OPTIM, value_optimizer="sgd")
        )
    with pytest.raises(ValueError, match="no weight decay"):
        SparseAdamW([torch.nn.Parameter(torch.zeros(2, 2))], weight_decay=0.1)


def test_shard_file_before_any_step_streams_zero_moments(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from pretrain.parallel import shard_files

    monkeypatch.setattr(shard_files, "ZERO_ROW_BLOCK", 100)  # 256 rows: three blocks of zeros
    torch.manual_seed(0)
    mp = MemoryParallel(Transformer(tiny_cfg()), init_memory_groups(1), SPARSE, kernel="torch")
    (path, _) = mp.save(tmp_path)
    saved = load_file(str(path))
    assert torch.equal(saved["weight"], mp.parameters()[0].detach())
    assert saved["exp_avg"].shape == saved["exp_avg_sq"].shape == (256, 32)
    assert not saved["exp_avg"].any() and not saved["exp_avg_sq"].any() and saved["step"].item() == 0
    assert not list(tmp_path.glob(".*tmp*"))
    mp.load(tmp_path)
    assert not mp.optimizer.state  # step 0: no optimizer state, as before the first step


def test_row_moves_as_wide_elements_are_bit_exact():
    """gather_rows / scatter_rows move rows as 16-, 8-, 4- or 2-byte elements when the row's
    bytes allow it, and as the table's own elements otherwise (odd widths, a column slice):
    the same bits as index_select / index_copy_ in every case."""
    from pretrain.parallel.sparse_adamw import _as_wide_rows, gather_rows, scatter_rows

    assert _as_wide_rows(torch.zeros(4, 8)).dtype == torch.complex128  # the wide path is taken
    assert _as_wide_rows(torch.zeros(4, 3, dtype=torch.bfloat16)).dtype == torch.int16
    gen = torch.Generator().manual_seed(5)
    rows = torch.tensor([0, 3, 4, 9])
    for dtype, width in ((torch.float32, 8), (torch.float32, 3), (torch.bfloat16, 5), (torch.bfloat16, 16)):
        base = torch.randn(10, width + 2, generator=gen).to(dtype)
        for table in (base[:, :width].contiguous(), base[:, :width]):  # contiguous, and a column slice
            want = table.clone()
            source = torch.randn(4, width, generator=gen).to(dtype)
            want.index_copy_(0, rows, source)
            assert torch.equal(
                gather_rows(table, rows).view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                table.index_select(0, rows).view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
            )
            scatter_rows(table, rows, source)
            assert torch.equal(table, want)
