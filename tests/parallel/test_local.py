"""Memory parallelism in one process (P = 1): initialisation, swap, optimizer, files, errors."""

from __future__ import annotations

import pytest
import torch

from kernels import reference
from parallel_helpers import dense_adamw, reference_world1, rel_err, tiny_cfg
from pretrain.config import OptimConfig
from pretrain.model.config import ConfigError
from pretrain.model.memory import ValueTable
from pretrain.model.objective import language_model_loss
from pretrain.model.transformer import Transformer
from pretrain.parallel import MemoryParallel, PartitionedValueTable, ShardFileError, init_memory_groups, shard_files
from pretrain.parallel.groups import MemoryGroups
from pretrain.parallel.shard_files import shard_file_name


def fake_groups(P: int, position: int) -> MemoryGroups:
    """Groups for shard construction only (forward at P > 1 needs real ranks)."""
    return MemoryGroups(P, P, position, None, None)


@pytest.mark.parametrize("v_dim,P", [(32, 2), (32, 4), (160, 2), (160, 5)])
def test_shards_concatenate_to_the_full_table(v_dim, P):
    full = ValueTable(300, v_dim, seed=7).weight.detach()
    shards = [PartitionedValueTable(300, v_dim, fake_groups(P, r), seed=7).shard.detach() for r in range(P)]
    assert torch.equal(torch.cat(shards, dim=1), full)


def test_init_statistics_and_seeds():
    v_dim = 128
    table = ValueTable(4096, v_dim, "torch", seed=3).weight.detach()  # positional args still work
    assert abs(table.std().item() - v_dim**-0.5) < 0.01 * v_dim**-0.5 * 5
    assert abs(table.mean().item()) < 1e-3
    assert not torch.equal(table, ValueTable(4096, v_dim, seed=4).weight.detach())
    # tiles are independent: no two 64-column blocks or row blocks repeat
    assert not torch.equal(table[:, :64], table[:, 64:])
    big = ValueTable(ValueTable.INIT_ROW_BLOCK + 10, 8, seed=0).weight.detach()
    assert not torch.equal(big[:10], big[ValueTable.INIT_ROW_BLOCK :])


def test_swap_keeps_values_out_of_module_parameters():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg())
    n_dense = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("values."))
    mp = MemoryParallel(model, init_memory_groups(1), OptimConfig())
    assert sum(p.numel() for p in model.parameters()) == n_dense
    assert not any(k.startswith("values.") for k in model.state_dict())
    assert [tuple(p.shape) for p in mp.parameters()] == [(256, 32), (256, 32)]
    # table i is seeded base + i (base = the original tables' seed, 0)
    for i, p in enumerate(mp.parameters()):
        assert torch.equal(p.detach(), ValueTable(256, 32, seed=i).weight.detach())
    # casting the model leaves the fp32 shards alone
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in mp.parameters())


def test_p1_forward_matches_the_reference_bag():
    groups = init_memory_groups(1)
    table = PartitionedValueTable(64, 24, groups, seed=1, kernel="torch")
    idx = torch.randint(0, 64, (5, 2, 3))
    w = torch.rand(5, 2, 3, dtype=torch.float64).float()
    out = table(idx, w)
    expect = reference.embedding_bag_gather(table.shard.detach().double(), idx, w.double())
    torch.testing.assert_close(out.double(), expect, rtol=1e-6, atol=1e-6)


def test_memory_parallel_p1_trains_like_plain_torch():
    cfg, optim = tiny_cfg(), OptimConfig(grad_clip=0.003)
    batches = torch.randint(0, 64, (3, 4, 9), generator=torch.Generator().manual_seed(1))
    ref, ref_losses, ref_norms = reference_world1(cfg, batches, optim)

    torch.manual_seed(0)
    model = Transformer(cfg)
    mp = MemoryParallel(model, init_memory_groups(1), optim, kernel="torch")
    dense = list(model.parameters())
    opt_d = dense_adamw(dense, optim)
    for step in range(3):
        tokens = batches[step]
        loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
        opt_d.zero_grad(), mp.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, optim.grad_clip)
        mp.reduce_gradients()
        norm = mp.clip_grad_norm(optim.grad_clip)
        assert norm.item() > optim.grad_clip  # clipping is exercised
        assert norm.item() == pytest.approx(ref_norms[step], rel=1e-6)
        opt_d.step(), mp.step(1.0)
        assert loss.item() == pytest.approx(ref_losses[step], rel=1e-6)
    # the clip norms are summed in a different order than torch's clip_grad_norm_ (ulp-level)
    for i, p in enumerate(mp.parameters()):
        assert rel_err(p.detach(), ref.values[i].weight.detach()) < 1e-6
    for (name, p), q in zip(model.named_parameters(), [p for n, p in ref.named_parameters() if "values" not in n]):
        assert rel_err(p.detach(), q.detach()) < 1e-6, name
    acc = mp.accounting()
    assert acc["value_shard_bytes"] == 2 * 256 * 32 * 4
    assert acc["optimizer_state_bytes"] >= 2 * acc["value_shard_bytes"]
    assert acc["comm_bytes_last_step"] == 0 and acc["lookups_last_step"] == 2


def trained_p1(tmp_path, steps=2):
    cfg, optim = tiny_cfg(), OptimConfig()
    torch.manual_seed(0)
    model = Transformer(cfg)
    mp = MemoryParallel(model, init_memory_groups(1), optim, kernel="torch")
    tokens = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        mp.zero_grad()
        language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        mp.reduce_gradients(), mp.clip_grad_norm(1.0), mp.step(0.5)
    return cfg, optim, model, mp, tokens


def test_save_load_consolidate_round_trip(tmp_path):
    cfg, optim, model, mp, tokens = trained_p1(tmp_path)
    written = mp.save(tmp_path)
    assert [p.name for p in written] == [shard_file_name(0, 0, 1), shard_file_name(1, 0, 1)]
    assert not list(tmp_path.glob("*.tmp"))
    full = shard_files.consolidate(tmp_path)
    assert set(full) == {"values.0.weight", "values.1.weight"}
    for i, p in enumerate(mp.parameters()):
        assert torch.equal(full[f"values.{i}.weight"], p.detach())

    torch.manual_seed(0)
    model2 = Transformer(cfg)
    mp2 = MemoryParallel(model2, init_memory_groups(1), optim, kernel="torch")
    mp2.load(tmp_path)
    assert torch.equal(model2(tokens[:, :-1]), model(tokens[:, :-1]))
    for p, q in zip(mp.parameters(), mp2.parameters()):
        s, s2 = mp.optimizer.state[p], mp2.optimizer.state[q]
        assert float(s["step"]) == float(s2["step"]) == 2.0
        assert torch.equal(s["exp_avg"], s2["exp_avg"]) and torch.equal(s["exp_avg_sq"], s2["exp_avg_sq"])
    # one more identical step from both
    for m in (mp, mp2):
        m.zero_grad()
    for m, mm in ((mp, model), (mp2, model2)):
        language_model_loss(mm(tokens[:, :-1]), tokens[:, 1:]).backward()
        m.reduce_gradients(), m.clip_grad_norm(1.0), m.step(1.0)
    for p, q in zip(mp.parameters(), mp2.parameters()):
        assert torch.equal(p, q)


def test_p1_checkpoint_resumed_at_p2_steps_like_p1(tmp_path):
    """Each P = 2 shard's columns are part of the saved P = 1 shard: one more AdamW step on
    the same gradient gives the P = 1 run's values (the moments were loaded correctly)."""
    cfg, optim, model, mp, tokens = trained_p1(tmp_path)
    mp.save(tmp_path)
    shards = []
    for position in range(2):
        torch.manual_seed(0)
        shard = MemoryParallel(Transformer(cfg), fake_groups(2, position), optim, kernel="torch")
        shard.load(tmp_path)
        shards.append(shard)
    gen = torch.Generator().manual_seed(3)
    grads = [torch.randn(p.shape, generator=gen) for p in mp.parameters()]
    for m in (mp, *shards):
        for t, g in zip(m.tables, grads):
            t.shard.grad = g[:, t.col_start : t.col_end].clone()
        m.step(1.0)
    for i, p in enumerate(mp.parameters()):
        resumed = torch.cat([s.tables[i].shard.detach() for s in shards], dim=1)
        assert rel_err(resumed, p.detach()) < 1e-6, i


def test_missing_and_truncated_files_name_the_file(tmp_path):
    cfg, optim, model, mp, tokens = trained_p1(tmp_path, steps=1)
    mp.save(tmp_path)
    target = tmp_path / shard_file_name(1, 0, 1)
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    with pytest.raises(ShardFileError, match=shard_file_name(1, 0, 1).replace(".", r"\.")):
        mp.load(tmp_path)
    target.unlink()
    with pytest.raises(
        ShardFileError, match="missing value-shard file .*" + shard_file_name(1, 0, 1).replace(".", r"\.")
    ):
        mp.load(tmp_path)
    with pytest.raises(ShardFileError, match="no value-shard files"):
        mp.load(tmp_path / "nowhere")


def test_bad_configuration_messages(without_process_group):
    with pytest.raises(ConfigError, match="parallel_size=2 needs torch.distributed initialised"):
        init_memory_groups(2)
    with pytest.raises(ConfigError, match="positive integer"):
        init_memory_groups(0)
    with pytest.raises(ConfigError, match="parallel_size=3 does not divide the value dim 32"):
        PartitionedValueTable(16, 32, fake_groups(3, 0))


@pytest.mark.parametrize("P", [2, 4, 8])
def test_the_norm_all_reduce_is_counted_at_the_size_of_the_tensor_it_sends(P):
    """clip_grad_norm all-reduces squared_norm's float64 scalar over the memory group; the traffic count
    took it as 4 bytes (half of what a ring all-reduce of it receives per rank)."""
    from pretrain.dense_optimizer import squared_norm
    from pretrain.parallel import accounting

    sq = squared_norm([torch.ones(3, 4)])
    ring = 2 * (P - 1) * sq.numel() * sq.element_size() // P
    assert accounting.norm_reduction_bytes(P, sq.element_size()) == ring
    assert accounting.norm_reduction_bytes(P) == ring  # the estimate's default: what clip_grad_norm sends
