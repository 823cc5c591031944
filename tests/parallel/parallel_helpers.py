"""Shared pieces of the memory-parallel tests: the tiny model, batches, the world-1 reference,
and the model + MemoryParallel (+ DeepSpeed engine) every rank builds."""

from __future__ import annotations

import torch

from pretrain.config import OptimConfig
from pretrain.model.config import MemoryConfig, ModelConfig
from pretrain.model.memory import ValueTable
from pretrain.model.objective import language_model_loss
from pretrain.model.transformer import Transformer
from pretrain.parallel import MemoryParallel

OPTIM = OptimConfig(lr=3e-3, value_lr=1e-2, weight_decay=0.1, grad_clip=0.003)
GLOBAL_BATCH, SEQ, STEPS = 4, 9, 3
PROBE = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))


def tiny_cfg(v_dim: int = 0, shared: bool = False) -> ModelConfig:
    """dim 32, 3 layers, two memory layers (layers 0 and 2) with their own 256-slot tables."""
    mem = MemoryConfig(
        layers=[0, 2], n_keys=16, heads=2, k=4, k_dim=16, v_dim=v_dim, shared_values=shared, kernel="torch"
    )
    return ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, max_seq_len=16, memory=mem)


def batches(steps: int = STEPS) -> torch.Tensor:
    return torch.randint(0, 64, (steps, GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def reference_world1(cfg: ModelConfig, data: torch.Tensor, optim: OptimConfig = OPTIM):
    """Plain torch, one process: full ValueTables seeded 0..n-1, dense AdamW, value AdamW
    (no weight decay), each group clipped by its own norm.
    Returns (model, losses, value-gradient norms before clipping)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    for i in range(len(model.values)):
        model.values[i] = ValueTable(cfg.memory.num_slots, cfg.value_dim, "torch", seed=i)
    dense = [p for n, p in model.named_parameters() if not n.startswith("values.")]
    values = list(model.values.parameters())
    opt_d = dense_adamw(dense, optim)
    opt_v = torch.optim.AdamW(
        values, lr=optim.value_lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=0.0
    )
    losses, norms = [], []
    for tokens in data:
        loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
        opt_d.zero_grad(), opt_v.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dense, optim.grad_clip)
        norms.append(torch.nn.utils.clip_grad_norm_(values, optim.grad_clip).item())
        opt_d.step(), opt_v.step()
        losses.append(loss.item())
    return model, losses, norms


def dense_adamw(params, optim: OptimConfig = OPTIM) -> torch.optim.AdamW:
    """AdamW over the dense parameters with `optim`'s lr, betas, eps and weight decay."""
    return torch.optim.AdamW(
        params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay
    )


def seeded_model(cfg: ModelConfig, groups, optim: OptimConfig = OPTIM) -> tuple[Transformer, MemoryParallel]:
    """The model drawn from seed 0 and its value shards (MemoryParallel, PyTorch kernels) for `groups`."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    return model, MemoryParallel(model, groups, optim, kernel="torch")


def values_only_model(cfg: ModelConfig, groups, optim: OptimConfig = OPTIM, steps: int = 2):
    """(model, MemoryParallel) whose values (only) took `steps` optimizer steps on the probe batch."""
    model, mp = seeded_model(cfg, groups, optim)
    for _ in range(steps):
        mp.zero_grad()
        language_model_loss(model(PROBE[:, :-1]), PROBE[:, 1:]).backward()
        mp.reduce_gradients(), mp.clip_grad_norm(1.0), mp.step(1.0)
    return model, mp


def deepspeed_model(cfg: ModelConfig, groups, optim: OptimConfig, stage: int, world: int):
    """(model, MemoryParallel, DeepSpeed engine): ZeRO `stage` with `dense_adamw` for the dense
    parameters, GLOBAL_BATCH split over `world` ranks, gradients clipped at optim.grad_clip."""
    import deepspeed

    model, mp = seeded_model(cfg, groups, optim)
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=dense_adamw(model.parameters(), optim), config=config)
    return model, mp, engine
