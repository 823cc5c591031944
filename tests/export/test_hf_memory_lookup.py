"""The exported HF model's memory lookup in bf16 (lm-eval's `dtype=bfloat16`): the bag sums in fp32
from the rows read alone, as an independent float64 gather-and-sum says, without a fp32 copy of the
whole value pool (made at every lookup until 2026-12-07: a 1M-slot pool decoded 100x slower)."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import load_config
from pretrain.hf.configuration_memlayers import MemlayersConfig
from pretrain.hf.modeling_memlayers import MemlayersForCausalLM
from tests.tensor_watch import LargestFloatTensor


def bf16_model():
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=512", "model.memory.n_keys=64"]).model
    torch.manual_seed(0)
    model = MemlayersForCausalLM(MemlayersConfig(model=asdict(cfg), pad_token_id=0)).eval()
    with torch.no_grad():
        for layer in model.layers:
            if layer.is_memory:
                layer.ffn.keys1.normal_()
                layer.ffn.keys2.normal_()
        model.values[0].weight.normal_()
    return model.to(torch.bfloat16)


@pytest.mark.parametrize("tokens", [7, 40])  # 896 entries read of a 4096-slot pool, and 5120 (the whole pool upcast)
def test_bf16_bag_reads_only_the_selected_rows_and_matches_float64(tokens):
    model = bf16_model()
    memory = next(layer.ffn for layer in model.layers if layer.is_memory)
    table = model.values[0]
    x = torch.randn(2, tokens, model.config.dim, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        with LargestFloatTensor() as seen:
            got = memory(x, table)
        weights, slots = memory.select(x)
        rows = table.weight[slots].double()  # (T, heads, k, v_dim): an independent gather and sum
        bag = (rows * weights.double()[..., None]).sum(dim=(1, 2)).reshape(*x.shape[:-1], -1)
        want = memory.out_proj(bag.float().to(torch.bfloat16) * F.silu(memory.gate_proj(x)))
    largest, pool = seen.largest, table.weight.numel()
    if 2 * slots.numel() < table.weight.shape[0]:  # fewer entries than half the pool: no fp32 copy of it
        assert largest < pool
    ulp = want.float().abs().max().item() * 2**-8  # bf16's spacing at the largest output: fp32 vs float64 sums
    assert (got.float() - want.float()).abs().max().item() <= ulp


def test_bf16_generate_does_not_copy_the_value_pool():
    model = bf16_model()
    prompt = torch.randint(4, 500, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), LargestFloatTensor() as seen:
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    assert out.shape == (2, 8)
    largest, pool = seen.largest, model.values[0].weight.numel()
    assert largest < pool
