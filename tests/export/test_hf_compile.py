"""The exported HF model under torch.compile(fullgraph=True): dynamo traces each forward whole
(until 2026-12-07 the padding check `bool(attention_mask.all())` was a data-dependent guard that
stopped the trace) and the compiled forward returns what the eager one returns, bit for bit."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from pretrain.config import load_config
from pretrain.hf.configuration_memlayers import MemlayersConfig
from pretrain.hf.modeling_memlayers import MemlayersForCausalLM


def tiny_model(dtype=torch.float32):
    cfg = load_config("configs/tiny.yaml", ["model.vocab_size=512", "model.memory.n_keys=64"]).model
    torch.manual_seed(0)
    model = MemlayersForCausalLM(MemlayersConfig(model=asdict(cfg), pad_token_id=0)).eval()
    with torch.no_grad():
        for p in model.parameters():  # every weight away from zero, so that a wrong mask shows
            p.normal_(std=0.3)
    return model.to(dtype)


def forward(model, **inputs):
    return model(use_cache=False, **inputs).logits


def prefill_then_one_step(model, input_ids, attention_mask):
    """Logits of the 7th token after the first 6 filled the cache, as generate() decodes."""
    first = model(input_ids[:, :6], attention_mask=attention_mask[:, :6], use_cache=True)
    return model(input_ids[:, 6:7], attention_mask=attention_mask[:, :7], cache=first.cache, use_cache=True).logits


def left_padded_mask(shape):
    mask = torch.ones(shape, dtype=torch.long)
    mask[1, :3] = 0
    return mask


@pytest.mark.parametrize(
    "case",
    ["left-padded mask", "mask of ones", "no mask", "given positions", "cached decoding step", "bf16 decoding"],
)
def test_the_compiled_forward_traces_whole_and_equals_eager(case):
    torch._dynamo.reset()
    model = tiny_model(torch.bfloat16 if case == "bf16 decoding" else torch.float32)
    ids = torch.randint(4, 500, (2, 9), generator=torch.Generator().manual_seed(1))
    fn, args = {
        "left-padded mask": (
            lambda i, m: forward(model, input_ids=i, attention_mask=m),
            (ids, left_padded_mask((2, 9))),
        ),
        "mask of ones": (
            lambda i, m: forward(model, input_ids=i, attention_mask=m),
            (ids, torch.ones(2, 9, dtype=torch.long)),
        ),
        "no mask": (lambda i: forward(model, input_ids=i), (ids,)),
        "given positions": (lambda i, p: forward(model, input_ids=i, position_ids=p), (ids, torch.arange(9)[None] + 5)),
        "cached decoding step": (lambda i, m: prefill_then_one_step(model, i, m), (ids, left_padded_mask((2, 9)))),
        # a lookup of one token reads fewer rows than half the pool: eager upcasts only those (unique)
        "bf16 decoding": (lambda i: forward(model, input_ids=i[:, :1]), (ids,)),
    }[case]
    compiled = torch.compile(fn, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
    with torch.no_grad():
        got, want = compiled(*args), fn(*args)
    assert torch.equal(got, want)


def test_a_compiled_forward_refuses_a_position_past_max_seq_len():
    """Eager raises a ValueError naming the position; compiled, the check runs inside the graph."""
    torch._dynamo.reset()
    model = tiny_model()
    limit = model.config.max_seq_len
    ids = torch.randint(4, 500, (1, 4), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(4)[None] + limit - 2
    compiled = torch.compile(lambda i, p: forward(model, input_ids=i, position_ids=p), fullgraph=True, backend="eager")
    with torch.no_grad(), pytest.raises(RuntimeError, match=f"a position exceeds max_seq_len={limit}"):
        compiled(ids, positions)
    with torch.no_grad(), pytest.raises(ValueError, match=f"position {limit + 1} exceeds the model's max_seq_len"):
        forward(model, input_ids=ids, position_ids=positions)


def test_a_compiled_bf16_decoding_step_upcasts_only_the_rows_it_reads():
    """Compiled, a bf16 lookup upcast the whole value pool to fp32 on every decoding step (unique's
    output size cannot be held by a graph): a 262,144-slot pool decoded at 199 ms a step against
    eager's 12 ms (CPU, backend=eager). The rows read are now gathered in bag order, a shape the graph
    holds, in eager and compiled alike. The graph's reference is its own tensors (no fp32 tensor of
    the pool's shape); the values' reference is the bag over the whole pool upcast, bit for bit."""
    import torch.nn.functional as F

    torch._dynamo.reset()
    model = tiny_model(torch.bfloat16)
    pool = model.values[0].weight
    shapes = []

    def recording(gm, example_inputs):  # dynamo's graph, each node's tensor as traced
        shapes.extend(
            (tuple(v.shape), v.dtype)
            for n in gm.graph.nodes
            if isinstance(v := n.meta.get("example_value"), torch.Tensor)
        )
        return gm.forward

    ids = torch.randint(4, 500, (2, 1), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.compile(lambda i: forward(model, input_ids=i), fullgraph=True, backend=recording)(ids)
    assert (tuple(pool.shape), pool.dtype) in shapes  # the pool is in the graph, in bf16
    assert (tuple(pool.shape), torch.float32) not in shapes

    memory = next(block.ffn for block in model.layers if block.is_memory)
    x = torch.randn(2, 1, model.config.dim, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    with torch.no_grad():
        weights, slots = memory.select(x)
        T = slots.shape[0]
        assert 2 * slots.numel() < pool.shape[0]  # the branch under test: fewer rows read than half the pool
        bag = F.embedding_bag(
            slots.reshape(T, -1), pool.float(), per_sample_weights=weights.reshape(T, -1).float(), mode="sum"
        )
        bag = bag.to(pool.dtype).reshape(2, 1, -1)
        want = memory.out_proj(bag * F.silu(memory.gate_proj(x)))
        assert torch.equal(memory(x, model.values[0]), want)
