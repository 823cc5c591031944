"""train.seed decides every initial weight, the value tables' included: runs with other seeds
start from other values (a seed study varies the memory too), the same seed from the same ones,
and seed 0 from the tables a plain ValueTable(seed=i) draws."""

from __future__ import annotations

import torch

from pretrain.spawn import run_gloo
from tests.train.helpers import tiny_config


def _initial_weights(rank: int, world: int, seeds: list[int], out: dict) -> None:
    from pretrain.build import build_model
    from pretrain.distributed import DistInfo

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    for i, seed in enumerate(seeds):
        cfg = tiny_config(
            "/tmp/unused-run",
            "/tmp/unused-cache",
            f"train.seed={seed}",
            "model.memory.layers=[0,1]",
            "model.memory.shared_values=false",
        )
        model, engine, optimizers = build_model(cfg, info)
        out[i] = {
            "values": [p.detach().clone() for p in optimizers.values.parameters()],
            "dense": model.tok_embeddings.weight.detach().clone(),
            "shape": (cfg.model.memory.num_slots, cfg.model.value_dim),
        }
        engine.destroy()


def test_value_tables_follow_train_seed():
    import torch.multiprocessing as mp

    from pretrain.model.memory import ValueTable

    out = mp.Manager().dict()
    run_gloo(_initial_weights, 1, [0, 1, 1, 2], out, deepspeed_comm=True)
    zero, one, one_again, two = (out[i] for i in range(4))
    assert len(zero["values"]) == 2  # one table per memory layer (not shared)
    for a, b in ((zero, one), (one, two), (zero, two)):
        assert not torch.equal(a["dense"], b["dense"])
        for table_a, table_b in zip(a["values"], b["values"]):
            assert not torch.equal(table_a, table_b)
    for table, again in zip(one["values"], one_again["values"]):
        assert torch.equal(table, again)
    assert not torch.equal(*one["values"])  # the tables of one run differ from each other too
    for i, table in enumerate(zero["values"]):
        assert torch.equal(table, ValueTable(*zero["shape"], seed=i).weight.detach())
