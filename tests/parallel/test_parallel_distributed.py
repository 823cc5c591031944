"""Memory parallelism on real gloo ranks (127.0.0.1) with DeepSpeed ZeRO 1/2/3.

Each world size is spawned once (module fixtures); the workers write their results as
safetensors files and the tests compare them with a plain-torch world-1 reference.
"""

from __future__ import annotations

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
    reference_world1,
    rel_err,
    seeded_model,
    tiny_cfg,
    values_only_model,
)
from pretrain.model.config import ConfigError
from pretrain.model.memory import ValueTable
from pretrain.model.objective import language_model_loss
from pretrain.parallel import init_memory_groups, shard_files
from pretrain.spawn import run_gloo

STAGES = (1, 2, 3)


def ds_train(cfg, groups, stage: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """3 steps: DeepSpeed (ZeRO `stage`) for dense params, MemoryParallel for values."""
    import deepspeed

    model, mp, engine = deepspeed_model(cfg, groups, OPTIM, stage, world)
    out = {}
    # never broadcast nor averaged: each shard is still its own columns of the seeded init
    for i, t in enumerate(mp.tables):
        expect = ValueTable(cfg.memory.num_slots, cfg.value_dim, seed=i).weight.detach()[:, t.col_start : t.col_end]
        out[f"init_ok.{i}"] = torch.tensor([float(torch.equal(t.shard.detach(), expect))])
    per_rank = GLOBAL_BATCH // world
    losses, norms = [], []
    for tokens in batches():
        local = tokens[rank * per_rank : (rank + 1) * per_rank]
        mp.zero_grad()
        loss = language_model_loss(engine(local[:, :-1]), local[:, 1:])
        engine.backward(loss)
        mp.reduce_gradients()
        norms.append(mp.clip_grad_norm(OPTIM.grad_clip))  # catches a wrong gradient scale (Adam would not)
        engine.step()
        mp.step(1.0)
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(mean / world)
    out["losses"] = torch.stack(losses)
    out["value_norms"] = torch.stack(norms)
    acc = mp.accounting()
    out["comm"] = torch.tensor(
        [acc["comm_bytes_last_step"], acc["comm_bytes_last_step_estimate"], acc["value_shard_bytes"]],
        dtype=torch.float64,
    )
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for name, p in model.named_parameters():
            out[f"dense.{name}"] = p.detach().clone()
    for i, p in enumerate(mp.parameters()):
        out[f"shard.{i}"] = p.detach().clone()
    engine.destroy()
    return out


def reload(cfg, groups, checkpoint_dir):
    model, mp = seeded_model(cfg, groups)
    mp.load(checkpoint_dir)
    with torch.no_grad():
        return model(PROBE[:, :-1]), mp


def worker(rank: int, world: int, out_dir: str, parallel_sizes: tuple, p1_dir: str, p2_dir: str) -> None:
    import torch.distributed as dist

    cfg, out_dir, res = tiny_cfg(), Path(out_dir), {}
    for bad in (3,):
        try:
            init_memory_groups(bad)
        except ConfigError as err:
            res["bad_p_message_ok"] = torch.tensor([float("does not divide the world size" in str(err))])
    for P in parallel_sizes:
        groups = init_memory_groups(P)
        for stage in STAGES:
            for k, v in ds_train(cfg, groups, stage, rank, world).items():
                res[f"P{P}.z{stage}.{k}"] = v
    if world == 2:  # re-sharding 2 -> 1 -> 2
        g2, g1 = init_memory_groups(2), init_memory_groups(1)
        model, mp = values_only_model(cfg, g2)
        with torch.no_grad():
            res["reshard.a"] = model(PROBE[:, :-1])
        mp.save(p2_dir)
        dist.barrier()
        res["reshard.b"], _ = reload(cfg, g1, p2_dir)
        _.save(out_dir / "p1_from_p2")
        dist.barrier()
        res["reshard.c"], mp_c = reload(cfg, g2, out_dir / "p1_from_p2")
        for i, (p, q) in enumerate(zip(mp.parameters(), mp_c.parameters())):
            s, sc = mp.optimizer.state[p], mp_c.optimizer.state[q]
            same = torch.equal(p, q) and torch.equal(s["exp_avg"], sc["exp_avg"])
            same = same and torch.equal(s["exp_avg_sq"], sc["exp_avg_sq"]) and float(s["step"]) == float(sc["step"])
            res[f"reshard.state_equal.{i}"] = torch.tensor([float(same)])
    else:  # 1 -> 4 and 2 -> 4
        g4 = init_memory_groups(4)
        res["reshard.from_p1"], _ = reload(cfg, g4, p1_dir)
        res["reshard.from_p2"], _ = reload(cfg, g4, p2_dir)
    save_file({k: v.contiguous() for k, v in res.items()}, str(out_dir / f"rank{rank}.safetensors"))


def spawn(world: int, parallel_sizes: tuple, tmp: Path, p1_dir: Path, p2_dir: Path) -> list[dict]:
    run_gloo(worker, world, str(tmp), parallel_sizes, str(p1_dir), str(p2_dir), deepspeed_comm=True)
    return [load_file(str(tmp / f"rank{r}.safetensors")) for r in range(world)]


@pytest.fixture(scope="module")
def reference():
    return reference_world1(tiny_cfg(), batches())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_parallel")
    p1_dir, p2_dir = root / "ckpt_p1", root / "ckpt_p2"
    model, mp = values_only_model(tiny_cfg(), init_memory_groups(1))
    mp.save(p1_dir)
    with torch.no_grad():
        logits = model(PROBE[:, :-1])
    return root, p1_dir, p2_dir, logits


@pytest.fixture(scope="module")
def world2(dirs):
    root, p1_dir, p2_dir, _ = dirs
    (root / "w2").mkdir()
    return spawn(2, (2,), root / "w2", p1_dir, p2_dir)


@pytest.fixture(scope="module")
def world4(dirs, world2):  # world 4 re-shards the P = 2 checkpoint world 2 wrote
    root, p1_dir, p2_dir, _ = dirs
    (root / "w4").mkdir()
    return spawn(4, (4, 2), root / "w4", p1_dir, p2_dir)


def check_equivalence(results, reference, P: int, world: int):
    ref_model, ref_losses, ref_norms = reference
    cfg = tiny_cfg()
    for stage in STAGES:
        pre = f"P{P}.z{stage}."
        for r in range(world):
            torch.testing.assert_close(
                results[r][pre + "losses"].double(), torch.tensor(ref_losses, dtype=torch.float64), rtol=1e-5, atol=0
            )
            torch.testing.assert_close(
                results[r][pre + "value_norms"].double(),
                torch.tensor(ref_norms, dtype=torch.float64),
                rtol=1e-5,
                atol=0,
            )
            for name, p in ref_model.named_parameters():
                if not name.startswith("values."):
                    assert rel_err(results[r][pre + "dense." + name], p.detach()) <= 1e-5, (stage, r, name)
        for i in range(len(cfg.memory.layers)):
            for g in range(world // P):  # every replica holds the same, complete table
                full = torch.cat([results[g * P + s][pre + f"shard.{i}"] for s in range(P)], dim=1)
                assert rel_err(full, ref_model.values[i].weight.detach()) <= 1e-5, (stage, g, i)
            for r in range(world):
                assert results[r][pre + f"init_ok.{i}"].item() == 1.0, (stage, r, i)
        for r in range(world):
            measured, estimate, shard_bytes = results[r][pre + "comm"].tolist()
            assert measured == estimate > 0
            assert shard_bytes == 2 * cfg.memory.num_slots * cfg.value_dim // P * 4


def test_world2_p2_matches_world1_for_zero_1_2_3(world2, reference):
    check_equivalence(world2, reference, P=2, world=2)


def test_world4_p4_matches_world1_for_zero_1_2_3(world4, reference):
    check_equivalence(world4, reference, P=4, world=4)


def test_world4_p2_two_replicas_matches_world1_for_zero_1_2_3(world4, reference):
    check_equivalence(world4, reference, P=2, world=4)


def test_shards_are_distinct_within_a_group(world2, world4):
    for results, P in ((world2, 2), (world4, 4)):
        a, b = results[0][f"P{P}.z1.shard.0"], results[1][f"P{P}.z1.shard.0"]
        assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-3)


def test_resharding_round_trips_give_identical_outputs(world2, world4, dirs):
    p1_logits = dirs[3]
    for r in range(2):
        assert torch.equal(world2[r]["reshard.a"], world2[r]["reshard.b"])
        assert torch.equal(world2[r]["reshard.a"], world2[r]["reshard.c"])
        for i in range(2):
            assert world2[r][f"reshard.state_equal.{i}"].item() == 1.0
    for r in range(4):
        assert torch.equal(world4[r]["reshard.from_p1"], p1_logits)
        assert torch.equal(world4[r]["reshard.from_p2"], world2[0]["reshard.a"])
    # the P = 2 training equals P = 1 training (values only), so all logits agree closely too
    assert rel_err(world2[0]["reshard.a"], p1_logits) < 1e-5


def test_consolidate_p2_checkpoint_matches_p1_equivalent(dirs, world2):
    root, p1_dir, p2_dir, _ = dirs
    full2, full1 = shard_files.consolidate(p2_dir), shard_files.consolidate(p1_dir)
    assert set(full2) == {"values.0.weight", "values.1.weight"}
    for k in full2:
        assert full2[k].shape == (256, 32) and rel_err(full2[k], full1[k]) < 1e-5


def test_p_not_dividing_world_size_is_refused(world2, world4):
    assert world2[0]["bad_p_message_ok"].item() == 1.0
    assert world4[0]["bad_p_message_ok"].item() == 1.0
