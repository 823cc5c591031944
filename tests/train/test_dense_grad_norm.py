"""The dense gradient norm is taken once per step: by memlayers where DeepSpeed takes none (ZeRO 0
in fp32), else by DeepSpeed's wrapper inside its step (read there), and it is the gradients' norm."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import one_rank_results, tiny_config


def _norm_passes(overrides: list[str], out: dict) -> None:
    import deepspeed.runtime.fp16.unfused_optimizer as unfused

    import pretrain.optimizers as optimizers_module

    normed = {"memlayers": 0, "deepspeed": 0}  # gradient elements each norm function read

    def counted(name, fn):
        def wrapper(tensors, *args, **kwargs):
            tensors = list(tensors)
            normed[name] += sum(t.numel() for t in tensors)
            return fn(tensors, *args, **kwargs)

        return wrapper

    memlayers_norm, deepspeed_norm = optimizers_module.squared_norm, unfused.get_weight_norm
    optimizers_module.squared_norm = counted("memlayers", memlayers_norm)
    unfused.get_weight_norm = counted("deepspeed", deepspeed_norm)
    try:
        _measure(overrides, normed, out)
    finally:  # the next case counts from its own originals
        optimizers_module.squared_norm, unfused.get_weight_norm = memlayers_norm, deepspeed_norm


def _measure(overrides: list[str], normed: dict, out: dict) -> None:
    from pretrain.build import build_model
    from pretrain.distributed import DistInfo
    from pretrain.model.objective import language_model_loss

    cfg = tiny_config("/tmp/unused-run", "/tmp/unused-cache", *overrides)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model, engine, optimizers = build_model(cfg, info)
    tokens = torch.randint(
        0, cfg.model.vocab_size, (cfg.train.micro_batch, 17), generator=torch.Generator().manual_seed(1)
    )
    loss = language_model_loss(engine(tokens[:, :-1]), tokens[:, 1:])
    optimizers.backward(loss, last_micro_batch=True)
    grads = [p.grad for name, p in model.named_parameters() if p.grad is not None and not name.startswith("values.")]
    reference = torch.stack([g.double().pow(2).sum() for g in grads]).sum().sqrt().item()
    norms = optimizers.clip()
    assert optimizers.step(1.0, skip=not norms.finite())
    out["passes"] = {name: n / sum(g.numel() for g in grads) for name, n in normed.items()}
    out["norm"] = float(optimizers.dense_grad_norm(norms))
    out["reference"] = reference
    engine.destroy()


CASES = {
    "zero0": (["train.zero_stage=0"], "memlayers"),
    "zero0-bf16": (["train.zero_stage=0", "train.dtype=bf16"], "deepspeed"),
}


def _every_case(rank: int, world: int, out: dict) -> None:
    """Both cases in one spawned rank (its start-up was most of each case's time)."""
    for name, (overrides, _) in CASES.items():
        result = {}
        _norm_passes(["train.global_batch=2", "train.micro_batch=2", *overrides], result)
        out[name] = result


@pytest.fixture(scope="module")
def cases() -> dict:
    return one_rank_results(_every_case)


@pytest.mark.parametrize("case", list(CASES))
def test_the_dense_gradient_norm_is_taken_once_per_step(cases, case):
    """Before, at ZeRO 0 in bf16 memlayers took the norm for its non-finite check (8fea78d) and
    DeepSpeed's bf16 optimizer took it again inside its step: two passes over the gradients."""
    out, taken_by = cases[case], CASES[case][1]
    passes = out["passes"]
    assert passes[taken_by] == 1 and sum(passes.values()) == 1, passes  # passes over the dense gradients
    assert out["norm"] == pytest.approx(out["reference"], rel=1e-5)
