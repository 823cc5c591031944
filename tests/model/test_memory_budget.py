"""pretrain.model.memory_budget against the tensors a run really holds, on the CPU.

Activations: the bytes autograd saves over one forward of the real model and objective,
taken with saved_tensors_hooks (each storage once; parameters and the rotary table left out),
for every train.activation_checkpointing mode, fp32 and bf16. The estimate must equal them
exactly (device="cpu": the composite RMSNorm the CPU runs).
Memory parallelism (P = 2, two gloo ranks): the same, plus the lookup tape a checkpointed memory
block keeps (measured where it records), and the value shard, gradient and moments of each value
optimizer against MemoryParallel's tensors.
Model states: DeepSpeed's engine built by the trainer's build_model (world 1), one step: the
parameters, the optimizer's fp32 masters and moments after the step and the gradients each
inner step read, against the estimate's parameters + gradients + fp32 master + moments."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.model.memory_budget import activations, dense_states, estimate_memory, value_states
from pretrain.model.objective import training_objective
from pretrain.model.transformer import Transformer
from pretrain.parallel.activation_checkpointing import apply_activation_checkpointing
from tests.train.helpers import one_rank_results, tiny_config

SMALL = [
    "model.dim=32",
    "model.n_layers=4",
    "model.n_heads=4",
    "model.max_seq_len=32",
    "model.memory.layers=[1,2]",
    "model.memory.n_keys=16",
    "model.memory.heads=2",
    "model.memory.k=4",
    "model.memory.k_dim=16",
    "model.memory.kernel=torch",
    "model.vocab_size=384",
    "data.vocab_size=384",
    "data.seq_len=16",
]
B, S = 2, 16


def saved_bytes(cfg, objective=training_objective) -> int:
    """Bytes of the distinct storages autograd saves over one forward + `objective` of cfg's model."""
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    if cfg.train.dtype == "bf16":  # as DeepSpeed's bf16 cast; the value shards stay fp32 (pretrain/parallel)
        model.bfloat16()
        model.values.float()
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_layers)
    model.rotary(S, torch.device("cpu"))
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip.add(model._freqs.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.model.vocab_size, (B, S), generator=g)
    targets = torch.randint(0, cfg.model.vocab_size, (B, S), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective(model(tokens), targets)
    return sum(seen.values())


@pytest.mark.parametrize("mode", ["none", "full", "memory", "selective"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", [[], ["model.memory.qk_norm=false", "model.n_kv_heads=2", "model.memory.v_dim=48"]])
def test_saved_activations_match_the_estimate_exactly(dtype, mode, variant):
    cfg = load_config(None, [*SMALL, *variant, f"train.dtype={dtype}", f"train.activation_checkpointing={mode}"])
    estimate = activations(cfg, B, S, device="cpu")
    assert estimate["blocks"] + estimate["head_and_loss"] == saved_bytes(cfg)


@pytest.fixture(scope="module")
def compiled_objective():
    from pretrain.parallel.compile import compile_objective

    return compile_objective(training_objective)


@pytest.mark.parametrize("mode", ["none", "full"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_the_compiled_objective_matches_the_estimate_exactly(compiled_objective, dtype, mode):
    """train.compile's objective saves the logits (not an fp32 copy of their log-softmax); the blocks
    run eager here (the estimate counts compiled blocks as eager ones, an upper bound)."""
    cfg = load_config(
        None, [*SMALL, f"train.dtype={dtype}", f"train.activation_checkpointing={mode}", "train.compile=true"]
    )
    estimate = activations(cfg, B, S, device="cpu")
    assert estimate["blocks"] + estimate["head_and_loss"] == saved_bytes(cfg, compiled_objective)
    eager = activations(load_config(None, [*SMALL, f"train.dtype={dtype}"]), B, S, device="cpu")
    assert estimate["backward_transient"] < eager["backward_transient"]


def test_checkpointing_keeps_less_and_the_cuda_norm_saves_less_than_the_cpu_one():
    none = load_config(None, [*SMALL, "train.dtype=bf16"])
    full = load_config(None, [*SMALL, "train.dtype=bf16", "train.activation_checkpointing=full"])
    assert activations(full, B, S)["blocks"] == 4 * 2 * B * S * 32  # one bf16 (B, S, dim) input per block
    assert activations(none, B, S)["blocks"] < activations(none, B, S, device="cpu")["blocks"]


def _model_states(overrides: list[str], out: dict) -> None:
    from pretrain.build import build_model
    from pretrain.dense_optimizer import SkippableAdamW
    from pretrain.distributed import DistInfo
    from pretrain.model.objective import language_model_loss

    cfg = tiny_config("/tmp/unused-run", "/tmp/unused-cache", *overrides)
    model, engine, optimizers = build_model(
        cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    )
    dense = list(model.parameters())
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    optimizers.backward(language_model_loss(engine(tokens[:, :-1]), tokens[:, 1:]), last_micro_batch=True)
    grads: dict[int, int] = {}  # every gradient storage an inner step saw: the model's and the masters'
    inner_optimizers = []
    original = SkippableAdamW.step

    def step(self, closure=None):
        inner_optimizers.append(self)
        for p in dense + [p for group in self.param_groups for p in group["params"]]:
            if p.grad is not None:
                grads[p.grad.untyped_storage().data_ptr()] = p.grad.untyped_storage().nbytes()
        return original(self, closure)

    SkippableAdamW.step = step
    try:
        optimizers.clip()
        assert optimizers.step(1.0, skip=False)
    finally:
        SkippableAdamW.step = original
    held = {}  # parameters, fp32 masters, moments (the per-tensor step counters left out: scalars)
    inner = inner_optimizers[0]
    masters = [p for group in inner.param_groups for p in group["params"]]
    tensors = dense + masters + [v for p in masters for k, v in inner.state[p].items() if k != "step"]
    for t in tensors:
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    accounting = optimizers.values.accounting()
    out[" ".join(overrides)] = {
        "trained": sum(p.numel() for p in dense),
        "states": sum(held.values()) + sum(grads.values()),
        "value_shard": accounting["value_shard_bytes"],
        "value_moments": accounting["optimizer_state_bytes"],
    }
    engine.destroy()


STATE_CASES = [["train.zero_stage=0"], ["train.zero_stage=0", "train.dtype=bf16"], ["train.zero_stage=1"]]
STATE_CASES += [["train.zero_stage=1", "train.dtype=bf16"]]


def _every_state_case(rank: int, world: int, out: dict) -> None:
    for overrides in STATE_CASES:  # one spawned rank: its start-up is most of the time
        _model_states(["train.global_batch=2", "train.micro_batch=2", *overrides], out)


@pytest.fixture(scope="module")
def measured_states() -> dict:
    return one_rank_results(_every_state_case)


@pytest.mark.parametrize("overrides", STATE_CASES, ids=lambda o: "-".join(o))
def test_model_states_match_deepspeeds_tensors(measured_states, overrides):
    measured = measured_states[" ".join(["train.global_batch=2", "train.micro_batch=2", *overrides])]
    cfg = tiny_config("/tmp/unused-run", "/tmp/unused-cache", *overrides)
    dense = dense_states(measured["trained"], cfg.train.dtype, cfg.train.zero_stage, 1)
    assert dense["parameters"] + dense["gradients"] + dense["fp32_master"] + dense["adam_moments"] == measured["states"]
    values = value_states(cfg, 2, cfg.data.seq_len, 1)
    assert values["value_shards"] == measured["value_shard"]
    assert values["value_moments"] == measured["value_moments"]
    assert estimate_memory(cfg, 1, 2).dense["parameters"] == dense["parameters"]


def _memory_parallel_rank(rank: int, world: int, out: dict) -> None:
    """P = 2: the activations (saved tensors + the lookup tape a checkpointed memory block keeps),
    and the value shard, its gradient and optimizer state under each value optimizer."""
    from pretrain.model import recompute
    from pretrain.parallel import MemoryParallel, init_memory_groups

    groups = init_memory_groups(2)
    taped: dict[int, int] = {}
    original_record = recompute.LookupTape.record

    def record(self, entry):
        for t, _ in entry:
            taped[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return original_record(self, entry)

    recompute.LookupTape.record = record
    try:
        for dtype in ("fp32", "bf16"):
            for mode in ("none", "full", "memory", "selective"):
                cfg = load_config(None, [*SMALL, "model.memory.parallel_size=2", f"train.dtype={dtype}"])
                torch.manual_seed(0)
                model = Transformer(cfg.model)
                values = MemoryParallel(model, groups, cfg.optim, kernel="torch")
                if dtype == "bf16":
                    model.bfloat16()  # the shards are not module parameters: they stay fp32, as in a run
                apply_activation_checkpointing(model, mode)
                taped.clear()
                out[f"{rank} {dtype} {mode}"] = _saved_over_forward(model, values.parameters(), rank) + sum(
                    taped.values()
                )
    finally:
        recompute.LookupTape.record = original_record
    for optimizer, momentum in (
        ("adamw", "float32"),
        ("sparse_adamw", "bfloat16"),
        ("sparse_rowwise_adamw", "bfloat16"),
    ):
        cfg = load_config(
            None,
            [*SMALL, "model.memory.parallel_size=2", f"optim.value_optimizer={optimizer}"]
            + [f"optim.value_momentum_dtype={momentum}", "optim.weight_decay=0"],
        )
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        values = MemoryParallel(model, groups, cfg.optim, kernel="torch")
        for micro_batch in range(2):  # two micro-batches: the sparse entries of both accumulate
            g = torch.Generator().manual_seed(10 * rank + micro_batch)
            tokens = torch.randint(0, cfg.model.vocab_size, (B, S + 1), generator=g)
            training_objective(model(tokens[:, :-1]), tokens[:, 1:]).total.backward()
        gradient = values.grad_bytes()
        values.reduce_gradients(), values.clip_grad_norm(1.0), values.step(1.0)
        accounting = values.accounting()
        out[f"{rank} {optimizer}"] = {
            "shard": accounting["value_shard_bytes"],
            "gradient": gradient,
            "moments": accounting["optimizer_state_bytes"],
        }


def _saved_over_forward(model, value_shards, rank: int) -> int:
    model.rotary(S, torch.device("cpu"))
    skip = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *value_shards]}
    skip.add(model._freqs.untyped_storage().data_ptr())
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(rank)
    tokens = torch.randint(0, model.cfg.vocab_size, (B, S), generator=g)
    targets = torch.randint(0, model.cfg.vocab_size, (B, S), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        objective = training_objective(model(tokens), targets)
    objective.total.backward()  # the group's collectives pair up: every rank runs the backward
    return sum(seen.values())


@pytest.fixture(scope="module")
def memory_parallel() -> dict:
    return spawned_results(2, _memory_parallel_rank)


def spawned_results(world: int, fn) -> dict:
    """fn(rank, world, out) on `world` spawned gloo ranks filling the shared dict `out`."""
    import torch.multiprocessing as mp

    from pretrain.spawn import run_gloo

    out = mp.Manager().dict()
    run_gloo(fn, world, out)
    return dict(out)


@pytest.mark.parametrize("mode", ["none", "full", "memory", "selective"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_memory_parallel_activations_match_the_estimate_exactly(memory_parallel, dtype, mode):
    cfg = load_config(
        None, [*SMALL, "model.memory.parallel_size=2", f"train.dtype={dtype}", f"train.activation_checkpointing={mode}"]
    )
    estimate = activations(cfg, B, S, device="cpu")
    for rank in range(2):
        assert memory_parallel[f"{rank} {dtype} {mode}"] == estimate["blocks"] + estimate["head_and_loss"]


@pytest.mark.parametrize("optimizer", ["adamw", "sparse_adamw", "sparse_rowwise_adamw"])
def test_memory_parallel_value_states_match_the_shards(memory_parallel, optimizer):
    momentum = "float32" if optimizer == "adamw" else "bfloat16"
    cfg = load_config(
        None,
        [*SMALL, "model.memory.parallel_size=2", f"optim.value_optimizer={optimizer}"]
        + [f"optim.value_momentum_dtype={momentum}", "train.global_batch=4", "train.micro_batch=2"],
    )
    estimate = value_states(cfg, B, S, accumulation_steps=2)  # each rank ran 2 micro-batches
    for rank in range(2):
        measured = memory_parallel[f"{rank} {optimizer}"]
        assert measured["shard"] == estimate["value_shards"] == 256 * 32 // 2 * 4  # 16^2 slots, v_dim 32 / P, fp32
        assert measured["moments"] == estimate["value_moments"]
        if optimizer == "adamw":
            assert measured["gradient"] == estimate["value_gradients"]
        else:  # the bound: every lookup of every micro-batch reads min(slots, P T H k) distinct rows
            assert 0 < measured["gradient"] <= estimate["value_gradients"]


def test_a_shared_tables_sparse_gradient_rows_are_those_read():
    """Row-sparse value gradients of a shared table over two lookups and two micro-batches: each
    lookup's rows are added into a buffer as its backward ends, so the gradient holds the distinct
    slots read (the union of the layers' indices) on any device (tests/parallel/test_sparse_values.py
    checks this with autograd's sparse add concatenating, as on CUDA); the buffer is within the
    estimate's bound."""
    from pretrain.parallel import MemoryParallel, init_memory_groups

    cfg = load_config(
        None,
        [*SMALL, "model.memory.shared_values=true", "optim.value_optimizer=sparse_adamw", "optim.weight_decay=0"],
    )
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    values = MemoryParallel(model, init_memory_groups(1), cfg.optim, kernel="torch")
    read = []
    row_bytes = 4 * cfg.model.value_dim + 8
    for micro_batch in range(2):
        tokens = torch.randint(
            0, cfg.model.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(micro_batch)
        )
        training_objective(model(tokens[:, :-1]), tokens[:, 1:]).total.backward()
        read += [layer.last_indices.flatten() for layer in model.memory_layers()]
        assert values.grad_bytes() == torch.cat(read).unique().numel() * row_bytes
    estimate = value_states(cfg, B, S, accumulation_steps=2)
    (shard,) = values.parameters()
    held = shard._held_rows  # the buffer the lookups were added into, with its spare room, and the row map
    buffer = held.grads.numel() * held.grads.element_size() + 8 * held.rows.numel() + 8 * held.place.numel()
    assert values.grad_bytes() < buffer <= estimate["value_gradients"] == 256 * row_bytes + 8 * 256  # 16^2 slots
    # adding a lookup: its own rows (at most the 256 slots) with 25 bytes of ids each, and a growth
    per_lookup = min(256, B * S * 2 * 4)
    assert estimate["value_gradient_add"] == per_lookup * (row_bytes + 25) + 256 * row_bytes
