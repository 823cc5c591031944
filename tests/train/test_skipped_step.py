"""A skipped optimizer step (non-finite loss) is invisible afterwards: at every ZeRO stage and
dtype, a run that skips a step and then takes steps A, B ends with the same weights, dense and
values, as a run that took only A and B. DeepSpeed calls the inner optimizer once per parameter
group at ZeRO 1-3 and may skip the call itself on non-finite gradients, so a skip flag consumed
by one call would have skipped one group only, or leaked into step A."""

from __future__ import annotations

import pytest
import torch

from tests.train.helpers import one_rank_results, tiny_config


def weights(model, values, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    out = {}
    for name, p in model.named_parameters():
        if name.startswith("values."):
            continue
        with deepspeed.zero.GatheredParameters([p], enabled=stage == 3):
            out[name] = p.detach().float().clone()
    for i, p in enumerate(values.parameters()):
        out[f"value_shard.{i}"] = p.detach().float().clone()
    return out


def run_steps(cfg, poison: str | None) -> dict:
    """Steps on two fixed batches, optionally after a poisoned one, skipped as the trainer
    decides: `loss` (a NaN loss) or `dense_grad` (a finite loss, but an infinite gradient of
    one dense weight, which DeepSpeed sees inside its step at ZeRO 1-3)."""
    from pretrain.build import build_model
    from pretrain.distributed import DistInfo
    from pretrain.model.objective import language_model_loss

    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    model, engine, optimizers = build_model(cfg, info)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (3, cfg.train.micro_batch, 17), generator=gen)
    snapshots = {"start": weights(model, optimizers.values, cfg.train.zero_stage)}
    for step, batch in enumerate(tokens if poison else tokens[1:]):
        poisoned = poison if step == 0 else None
        hook = model.output.weight.register_hook(lambda g: g * float("inf")) if poisoned == "dense_grad" else None
        loss = language_model_loss(engine(batch[:, :-1]), batch[:, 1:]) * (float("nan") if poisoned == "loss" else 1.0)
        optimizers.backward(loss, last_micro_batch=True)
        norms = optimizers.clip()
        snapshots[f"applied{step}"] = optimizers.step(1.0, skip=not (torch.isfinite(loss) and norms.finite()))
        if hook is not None:
            hook.remove()
        snapshots[f"step{step}"] = weights(model, optimizers.values, cfg.train.zero_stage)
        snapshots[f"lookups{step}"] = len(optimizers.values.last_step_lookups)  # this step's only
    assert not optimizers.dense_optimizer.skip  # the flag does not outlive the step
    engine.destroy()
    return snapshots


CASES = {
    "zero0": ["train.zero_stage=0"],
    "zero0-bf16": ["train.zero_stage=0", "train.dtype=bf16"],
    "zero1": ["train.zero_stage=1"],
    "zero1-bf16": ["train.zero_stage=1", "train.dtype=bf16"],
    "zero3": ["train.zero_stage=3"],
}
POISONS = ("loss", "dense_grad")


def _every_case(rank: int, world: int, out: dict) -> None:
    """All cases in one spawned rank (its start-up, not the steps, was most of each case's time):
    per configuration the run without a skip, then the run skipping each poison's step. A case
    that raises records its traceback, which fails that case's test only."""
    import traceback

    for name, overrides in CASES.items():
        cfg = tiny_config(
            "/tmp/unused-run", "/tmp/unused-cache", "train.global_batch=2", "train.micro_batch=2", *overrides
        )
        try:
            plain = run_steps(cfg, None)
        except Exception:
            plain = traceback.format_exc()
        for poison in POISONS:
            try:
                out[f"{poison}-{name}"] = {"skipped": run_steps(cfg, poison), "plain": plain}
            except Exception:
                out[f"{poison}-{name}"] = traceback.format_exc()


@pytest.fixture(scope="module")
def cases() -> dict:
    return one_rank_results(_every_case)


@pytest.mark.parametrize("config", list(CASES))
@pytest.mark.parametrize("poison", POISONS)
def test_skipped_step_leaves_no_trace(cases, config, poison):
    """`dense_grad`: before, the values took the step whose dense update DeepSpeed dropped at
    ZeRO 1-3, and at ZeRO 0 in fp32, where DeepSpeed checks nothing, the dense weights took an
    infinite update too."""
    case = cases[f"{poison}-{config}"]
    if isinstance(case, str) or isinstance(case["plain"], str):  # the case raised: its traceback
        pytest.fail(case if isinstance(case, str) else case["plain"])
    skipped, plain = case["skipped"], case["plain"]
    assert (skipped["applied0"], skipped["applied1"], plain["applied0"]) == (False, True, True)
    # each step's lookup count (memory traffic metrics) is its own, also right after a skip
    assert skipped["lookups0"] == skipped["lookups1"] == plain["lookups0"] == 1
    for name, start in skipped["start"].items():
        assert torch.equal(skipped["step0"][name], start), f"{name} changed on the skipped step"
        assert torch.equal(plain["start"][name], start)
        # the steps after the skip: every parameter, dense and values, as without the skip
        for after_skip, without in (("step1", "step0"), ("step2", "step1")):
            assert torch.equal(skipped[after_skip][name], plain[without][name]), f"{name} at {after_skip}"
        assert not torch.equal(plain["step1"][name], start), f"{name} never updated"
