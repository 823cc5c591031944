"""Sparse value gradients + lazy Adam on 2 gloo ranks: P = 1 (two replicas) and P = 2, ZeRO 1 and 3.

One world-2 spawn writes every result; the tests compare it with the dense path's
gradients (same parameters, first step), with world-1 sparse training, and check that a
P = 2 sparse-optimizer checkpoint re-shards into P = 1 with its per-row state intact.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from parallel_helpers import (
    GLOBAL_BATCH,
    OPTIM,
    PROBE,
    batches,
    deepspeed_model,
    dense_adamw,
    rel_err,
    seeded_model,
    tiny_cfg,
    values_only_model,
)
from pretrain.model.objective import language_model_loss
from pretrain.model.transformer import Transformer
from pretrain.parallel import MemoryParallel, init_memory_groups
from pretrain.spawn import run_gloo

SPARSE = dataclasses.replace(OPTIM, value_optimizer="sparse_adamw")
ROWWISE = dataclasses.replace(OPTIM, value_optimizer="sparse_rowwise_adamw")


def dense_grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()


def train_values(cfg, groups, optim, stage: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """3 steps (DeepSpeed ZeRO `stage` for dense params); first-step value grads, final shards."""
    _, mp, engine = deepspeed_model(cfg, groups, optim, stage, world)
    per_rank, out, norms = GLOBAL_BATCH // world, {}, []
    for step, tokens in enumerate(batches()):
        local = tokens[rank * per_rank : (rank + 1) * per_rank]
        mp.zero_grad()
        engine.backward(language_model_loss(engine(local[:, :-1]), local[:, 1:]))
        mp.reduce_gradients()
        if step == 0:
            for i, p in enumerate(mp.parameters()):
                out[f"grad0.{i}"] = dense_grad(p)
                out[f"sparse0.{i}"] = torch.tensor([float(p.grad.is_sparse)])
        norms.append(mp.clip_grad_norm(optim.grad_clip))
        engine.step()
        mp.step(1.0)
    out["value_norms"] = torch.stack(norms)
    for i, p in enumerate(mp.parameters()):
        out[f"shard.{i}"] = p.detach().clone()
    engine.destroy()
    return out


def record_state(res: dict, prefix: str, mp: MemoryParallel) -> None:
    """Each shard's weight and optimizer state under `prefix`.<table>.<name>."""
    for i, p in enumerate(mp.parameters()):
        res[f"{prefix}.{i}.weight"] = p.detach()
        for name, tensor in mp.optimizer.state[p].items():
            res[f"{prefix}.{i}.{name}"] = tensor.reshape(1) if name == "step" else tensor


def worker(rank: int, world: int, out_dir: str, ckpt_dir: str) -> None:
    import torch.distributed as dist

    cfg, res = tiny_cfg(), {}
    for P in (1, 2):
        groups = init_memory_groups(P)
        for stage in (1, 3):
            for k, v in train_values(cfg, groups, SPARSE, stage, rank, world).items():
                res[f"P{P}.z{stage}.sparse.{k}"] = v
        for k, v in train_values(cfg, groups, OPTIM, 1, rank, world).items():
            res[f"P{P}.z1.dense.{k}"] = v
        for k, v in train_values(cfg, groups, ROWWISE, 1, rank, world).items():
            res[f"P{P}.z1.rowwise.{k}"] = v
    shared, groups = tiny_cfg(shared=True), init_memory_groups(2)  # one table read by both memory layers
    for name, optim in (("dense", OPTIM), ("sparse", SPARSE)):
        res[f"shared.{name}.grad0"] = train_values(shared, groups, optim, 3, rank, world)["grad0.0"]
    # re-shard 2 -> 1 of a sparse-optimizer checkpoint, element-wise and row-wise
    for name, optim in (("reshard", SPARSE), ("reshard_row", ROWWISE)):
        model, mp = values_only_model(cfg, init_memory_groups(2), optim)
        with torch.no_grad():
            res[f"{name}.p2_logits"] = model(PROBE[:, :-1])
        record_state(res, f"{name}.p2", mp)
        mp.save(Path(ckpt_dir) / name)
        dist.barrier()
        model1, mp1 = seeded_model(cfg, init_memory_groups(1), optim)
        mp1.load(Path(ckpt_dir) / name)
        with torch.no_grad():
            res[f"{name}.p1_logits"] = model1(PROBE[:, :-1])
        record_state(res, f"{name}.p1", mp1)
    save_file({k: v.contiguous() for k, v in res.items()}, str(Path(out_dir) / f"rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = tmp_path_factory.mktemp("sparse_values")
    run_gloo(worker, 2, str(root), str(root / "ckpt"), deepspeed_comm=True)
    return [load_file(str(root / f"rank{r}.safetensors")) for r in range(2)]


def world1_training(optim):
    """World 1, plain torch: the same 3 steps (dense AdamW, each group clipped by its own norm)."""
    model, mp = seeded_model(tiny_cfg(), init_memory_groups(1), optim)
    opt = dense_adamw(model.parameters(), optim)
    norms = []
    for tokens in batches():
        mp.zero_grad(), opt.zero_grad()
        language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), optim.grad_clip)
        mp.reduce_gradients()
        norms.append(mp.clip_grad_norm(optim.grad_clip).item())
        opt.step(), mp.step(1.0)
    return [p.detach().clone() for p in mp.parameters()], norms


@pytest.fixture(scope="module")
def world1_sparse():
    return world1_training(SPARSE)


@pytest.fixture(scope="module")
def world1_rowwise():
    return world1_training(ROWWISE)


def full_table(results, key: str, P: int) -> torch.Tensor:
    return torch.cat([results[s][key] for s in range(P)], dim=1)


@pytest.mark.parametrize("P", [1, 2])
def test_sparse_gradients_equal_dense_nonzero_rows(world2, P):
    for stage in (1, 3):
        for i in range(2):
            dense = full_table(world2, f"P{P}.z1.dense.grad0.{i}", P)
            sparse = full_table(world2, f"P{P}.z{stage}.sparse.grad0.{i}", P)
            assert all(world2[r][f"P{P}.z{stage}.sparse.sparse0.{i}"].item() == 1.0 for r in range(2))
            read = dense.abs().sum(1) > 0
            assert 0 < read.sum() < dense.shape[0]
            assert not sparse[~read].any()
            torch.testing.assert_close(sparse[read], dense[read], rtol=0, atol=1e-6)
            if P == 1:  # two replicas of the whole table: the reduced gradients agree bitwise
                assert torch.equal(
                    world2[0][f"P1.z{stage}.sparse.grad0.{i}"], world2[1][f"P1.z{stage}.sparse.grad0.{i}"]
                )


def test_shared_table_sparse_gradient_equals_dense_at_p2_zero3(world2):
    dense, sparse = full_table(world2, "shared.dense.grad0", 2), full_table(world2, "shared.sparse.grad0", 2)
    read = dense.abs().sum(1) > 0
    assert 0 < read.sum() < dense.shape[0] and not sparse[~read].any()
    torch.testing.assert_close(sparse[read], dense[read], rtol=0, atol=1e-6)


def assert_matches_world1(world2, run: str, world1, P: int) -> None:
    """Both ranks' value norms per step, and the whole tables, equal the world-1 run's."""
    shards, norms = world1
    for r in range(2):
        torch.testing.assert_close(
            world2[r][f"{run}.value_norms"].double(), torch.tensor(norms, dtype=torch.float64), rtol=1e-5, atol=0
        )
    for i in range(2):
        assert rel_err(full_table(world2, f"{run}.shard.{i}", P), shards[i]) < 1e-5


@pytest.mark.parametrize("P", [1, 2])
def test_sparse_training_matches_world1(world2, world1_sparse, P):
    for stage in (1, 3):
        assert_matches_world1(world2, f"P{P}.z{stage}.sparse", world1_sparse, P)
        for i in range(2):
            if P == 1:  # replicas stay identical
                assert torch.equal(
                    world2[0][f"P1.z{stage}.sparse.shard.{i}"], world2[1][f"P1.z{stage}.sparse.shard.{i}"]
                )


def test_sparse_checkpoint_reshards_2_to_1(world2):
    for r in range(2):
        assert torch.equal(world2[r]["reshard.p1_logits"], world2[r]["reshard.p2_logits"])
        for i in range(2):
            for name in ("weight", "exp_avg", "exp_avg_sq"):
                assert torch.equal(world2[r][f"reshard.p1.{i}.{name}"], full_table(world2, f"reshard.p2.{i}.{name}", 2))
            assert world2[r][f"reshard.p1.{i}.step"].item() == world2[0][f"reshard.p2.{i}.step"].item() == 2
    assert world2[0]["reshard.p2.0.exp_avg"].abs().sum(1).eq(0).any()  # lazy: some rows were never read


@pytest.mark.parametrize("P", [1, 2])
def test_rowwise_training_matches_world1(world2, world1_rowwise, P):
    """The row second moment sums g^2 over both column shards: P = 2 equals one process."""
    assert_matches_world1(world2, f"P{P}.z1.rowwise", world1_rowwise, P)


def test_rowwise_checkpoint_reshards_2_to_1(world2):
    for r in range(2):
        assert torch.equal(world2[r]["reshard_row.p1_logits"], world2[r]["reshard_row.p2_logits"])
        for i in range(2):
            for name in ("weight", "exp_avg"):
                got, want = world2[r][f"reshard_row.p1.{i}.{name}"], full_table(world2, f"reshard_row.p2.{i}.{name}", 2)
                assert torch.equal(got, want)
            row = world2[r][f"reshard_row.p1.{i}.exp_avg_sq_row"]
            assert row.shape == (256,) and row.gt(0).any()
            # one moment per full row: both shards of P = 2 hold the same one, and P = 1 loads it
            assert torch.equal(row, world2[0][f"reshard_row.p2.{i}.exp_avg_sq_row"])
            assert torch.equal(row, world2[1][f"reshard_row.p2.{i}.exp_avg_sq_row"])


def _row_means_at_p3(rank: int, world: int, rows: int) -> None:
    groups = init_memory_groups(3)
    mp = MemoryParallel(Transformer(tiny_cfg(v_dim=48)), groups, ROWWISE, kernel="torch")
    table = mp.tables[0]
    sq_sums = torch.full((rows,), float(rank + 1))  # every rank holds the same rows, its own columns
    got = mp._row_sq_mean(sq_sums, table.shard)
    assert torch.equal(got, torch.full((rows,), (1.0 + 2.0 + 3.0) / table.v_dim))


def test_rowwise_row_count_check_is_exact_past_float32():
    """P = 3 ranks with 5,592,407 rows each: the summed count, 16,777,221, is not a float32 (past
    2^24), and a float32 count check refused these equal row sets as different."""
    run_gloo(_row_means_at_p3, 3, 5_592_407)
