"""The transformer: tiny config trains a step; dense mode equals a from-scratch float64 transformer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from pretrain.config import load_config
from pretrain.model import ConfigError, MemoryPlus, Transformer, ValueTable, count_parameters, language_model_loss
from pretrain.model.kv_cache import KVCache
from pretrain.model.transformer import SwiGLU


def rms_norm(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, theta):
    """RoPE on consecutive pairs (x[2i], x[2i+1]) as complex multiplication. x (B, S, heads, hd)."""
    B, S, nh, hd = x.shape
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angles = torch.arange(S, dtype=torch.float64)[:, None] * freqs[None, :]  # (S, hd/2)
    xc = torch.view_as_complex(x.reshape(B, S, nh, hd // 2, 2).contiguous())
    return torch.view_as_real(xc * torch.polar(torch.ones_like(angles), angles)[None, :, None, :]).reshape(x.shape)


def causal_attention(q, k, v):
    """q (B, S, H, hd), k/v (B, S, KV, hd); query head h reads kv head h // (H / KV)."""
    B, S, H, hd = q.shape
    group = H // k.shape[2]
    out = torch.empty_like(q)
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    for h in range(H):
        kh, vh = k[:, :, h // group], v[:, :, h // group]
        scores = q[:, :, h] @ kh.transpose(1, 2) / math.sqrt(hd)  # (B, S, S)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[:, :, h] = probs @ vh
    return out


def transformer_float64(model: Transformer, tokens: torch.Tensor, memory_ffn=None) -> torch.Tensor:
    """The same decoder written from scratch in float64 from the model's weights.

    memory_ffn(layer_id, h) supplies the FFN output of memory layers (None: model has none).
    """
    cfg = model.cfg
    W = lambda t: t.detach().double()  # noqa: E731
    B, S = tokens.shape
    H, KV, hd = cfg.n_heads, cfg.kv_heads, cfg.dim // cfg.n_heads
    x = W(model.tok_embeddings.weight)[tokens]
    for i, block in enumerate(model.layers):
        h = rms_norm(x, W(block.attention_norm.weight), cfg.norm_eps)
        a = block.attention
        q = rotate((h @ W(a.wq.weight).T).reshape(B, S, H, hd), cfg.rope_theta)
        k = rotate((h @ W(a.wk.weight).T).reshape(B, S, KV, hd), cfg.rope_theta)
        v = (h @ W(a.wv.weight).T).reshape(B, S, KV, hd)
        x = x + causal_attention(q, k, v).reshape(B, S, H * hd) @ W(a.wo.weight).T
        h = rms_norm(x, W(block.ffn_norm.weight), cfg.norm_eps)
        if i in cfg.memory.layers:
            x = x + memory_ffn(i, h)
        else:
            f = block.ffn
            g = h @ W(f.w1.weight).T
            x = x + ((g * torch.sigmoid(g)) * (h @ W(f.w3.weight).T)) @ W(f.w2.weight).T
    return rms_norm(x, W(model.norm.weight), cfg.norm_eps) @ W(model.output.weight).T


def randomize(model: nn.Module, seed: int = 0) -> None:
    """O(1) activations everywhere, so that a wrong formula shows far above fp32 rounding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name == "tok_embeddings.weight":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() == 2 and not name.startswith("values."):
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


def test_tiny_config_forward_backward_is_finite(repo_root):
    cfg = load_config(repo_root / "configs/tiny.yaml").model
    torch.manual_seed(0)
    model = Transformer(cfg)
    assert len(model.memory_layers()) == len(cfg.memory.layers) > 0
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.max_seq_len + 1))
    logits = model(tokens[:, :-1])
    assert logits.shape == (2, cfg.max_seq_len, cfg.vocab_size)
    loss = language_model_loss(logits, tokens[:, 1:])
    loss.backward()
    assert torch.isfinite(loss)
    # small init: the untrained model predicts close to uniform
    assert abs(loss.item() - math.log(cfg.vocab_size)) < 0.1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_memory_disabled_is_an_ordinary_dense_transformer(repo_root):
    cfg = load_config(repo_root / "configs/tiny.yaml", ["model.memory.layers=[]"]).model
    model = Transformer(cfg)
    assert not any(isinstance(m, (MemoryPlus, ValueTable)) for m in model.modules())
    assert len(model.values) == 0 and model.memory_layers() == []
    assert all(isinstance(block.ffn, SwiGLU) for block in model.layers)
    counts = count_parameters(model)
    assert counts.memory_values == counts.memory_keys == counts.memory_other == 0
    randomize(model)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(tokens)
    want = transformer_float64(model, tokens)
    assert want.abs().max() > 1  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_grouped_query_attention_matches_float64(make_model_config, n_kv_heads):
    cfg = make_model_config(n_heads=4, n_kv_heads=n_kv_heads, memory=dict(layers=[]))
    model = Transformer(cfg)
    assert model.layers[0].attention.wk.weight.shape == (n_kv_heads * cfg.head_dim, cfg.dim)
    randomize(model, seed=n_kv_heads)
    tokens = torch.randint(0, cfg.vocab_size, (3, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(tokens)
    torch.testing.assert_close(got.double(), transformer_float64(model, tokens), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shared_values", [True, False])
def test_memory_blocks_are_wired_like_the_dense_ones(make_model_config, shared_values):
    """Residual stream, norms and table assignment around the memory layers (layer itself tested alone)."""
    cfg = make_model_config(n_layers=3, n_kv_heads=2, memory=dict(layers=[0, 2], shared_values=shared_values))
    model = Transformer(cfg)
    randomize(model)
    tables = [model.value_table_for(0), model.value_table_for(1)]
    assert (tables[0] is tables[1]) == shared_values
    memory_index = {0: 0, 2: 1}

    def memory_ffn(layer_id, h):
        block = model.layers[layer_id]
        return block.ffn(h.float(), tables[memory_index[layer_id]]).double()

    tokens = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(tokens)
        want = transformer_float64(model, tokens, memory_ffn)
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-4)


def test_tied_embeddings_share_one_parameter(make_model_config):
    torch.manual_seed(0)
    untied = Transformer(make_model_config(tie_embeddings=False))
    tied = Transformer(make_model_config(tie_embeddings=True))
    assert tied.output.weight is tied.tok_embeddings.weight
    V, d = tied.cfg.vocab_size, tied.cfg.dim
    n_untied = sum(p.numel() for p in untied.parameters())
    assert sum(p.numel() for p in tied.parameters()) == n_untied - V * d
    assert count_parameters(tied).total == count_parameters(untied).total - V * d

    # the shared weight's gradient is the sum of its two uses
    tied.load_state_dict(untied.state_dict() | {"output.weight": untied.tok_embeddings.weight.detach()})
    with torch.no_grad():
        untied.output.weight.copy_(untied.tok_embeddings.weight)
    tokens = torch.randint(0, V, (2, 9))
    for model in (tied, untied):
        language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    want = untied.tok_embeddings.weight.grad + untied.output.weight.grad
    torch.testing.assert_close(tied.tok_embeddings.weight.grad, want, rtol=1e-5, atol=1e-7)


def test_sequence_longer_than_max_seq_len_is_refused(make_model_config):
    model = Transformer(make_model_config(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


@pytest.mark.parametrize("cache_layers", [1, 5])
def test_a_kv_cache_for_another_depth_is_refused(make_model_config, cache_layers):
    model = Transformer(make_model_config())
    assert len(model.layers) not in (1, 5)
    with pytest.raises(ValueError, match=f"KV cache has {cache_layers} layers, the model {len(model.layers)}"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=KVCache(cache_layers))


@pytest.mark.parametrize(
    "key,value",
    [("rope_theta", 0.0), ("rope_theta", -1e4), ("rope_theta", math.nan), ("norm_eps", -1e-5), ("init_std", -0.02)],
)
def test_bad_float_hyper_parameters_are_refused_naming_the_key(make_model_config, key, value):
    """rope_theta <= 0 gave a NaN rotary table (attention then ran on without an error), a negative
    norm_eps NaN norms, a negative init_std an error from nn.init that named no key."""
    if key == "rope_theta":  # the symptom: the float64 rotation of a unit vector is not finite
        assert not torch.isfinite(rotate(torch.ones(1, 2, 1, 4, dtype=torch.float64), value)).all()
    with pytest.raises(ConfigError, match=rf"model\.{key}={value}"):
        Transformer(make_model_config(**{key: value}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_the_written_out_rotation(dtype):
    """apply_rotary (one complex product) against (x0 cos - x1 sin, x0 sin + x1 cos) written out
    in float64 on the same inputs: the output and the input gradient within the dtype's rounding."""
    from pretrain.model.transformer import apply_rotary, rotary_frequencies

    g = torch.Generator().manual_seed(0)
    B, S, H, hd = 2, 9, 3, 8
    freqs = rotary_frequencies(hd, 12, 10000.0)[3 : 3 + S]  # an offset, as a KV cache's continuation reads it
    x = torch.randn(B, S, H, hd, generator=g).to(dtype).requires_grad_()
    grad = torch.randn(B, S, H, hd, generator=g).to(dtype)
    out = apply_rotary(x, freqs)
    (dx,) = torch.autograd.grad(out, x, grad)

    x64 = x.detach().double().requires_grad_()
    cos, sin = (freqs[:, None, :, i].double() for i in (0, 1))
    x0, x1 = x64[..., 0::2], x64[..., 1::2]
    want = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).flatten(-2)
    (dx_want,) = torch.autograd.grad(want, x64, grad.double())
    assert out.dtype == dx.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, want.to(dtype))
    torch.testing.assert_close(dx, dx_want.to(dtype))


def _computing_ops(fn):
    """(tensor inputs, output) of each aten call under `fn` that writes new memory: views (an output
    sharing an input's storage) are left out by what they do, not by name, so that a torch release
    renaming or adding view ops changes nothing here."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]
            for o in (t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
                storages = {t.untyped_storage().data_ptr() for t in inputs}
                if o.untyped_storage().data_ptr() not in storages:
                    self.ops.append((inputs, o))
            return out

    with Record() as record:
        fn()
    return record.ops


def rotary_written_out(x, freqs):
    """The rotation as formulas, (x0 cos - x1 sin, x0 sin + x1 cos) per pair, as apply_rotary ran it
    before (its values: test_rotary_matches_the_written_out_rotation)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(x.dtype)


def test_rotary_is_one_product_forward_and_one_backward():
    """RoPE runs as one complex multiplication each way (it was selects, four products, a
    difference, a sum and a stack forward and 12 kernels backward: at the demo's shape 5.5x the
    CPU time, 8 calls per step). Asserted by what the aten calls do, not their names (a count of
    names broke as torch added or renamed view ops): every call that writes memory works on complex
    numbers, and one product (a call of two tensors) runs forward and one backward; the backward may
    also materialise the conjugate of the angles (a copy of one tensor)."""
    from pretrain.model.transformer import apply_rotary, rotary_frequencies

    def products(ops):
        return [o for inputs, o in ops if len(inputs) == 2]

    def forward_and_backward_ops(rotate):
        out = []
        forward_ops = _computing_ops(lambda: out.append(rotate(x, freqs)))
        return forward_ops, _computing_ops(lambda: torch.autograd.grad(out[0], x, grad))

    def on_complex_numbers(ops):
        return all(t.is_complex() for inputs, o in ops for t in (*inputs, o))

    x = torch.randn(2, 5, 3, 8, requires_grad=True)
    grad, freqs = torch.randn(2, 5, 3, 8), rotary_frequencies(8, 5, 10000.0)
    # the check tells the forms apart: the written-out one computes on real numbers, in 7 calls
    # of two tensors (4 products, a difference, a sum, a stack) forward
    forward_ops, backward_ops = forward_and_backward_ops(rotary_written_out)
    assert not on_complex_numbers(forward_ops) and len(products(forward_ops)) > 1
    forward_ops, backward_ops = forward_and_backward_ops(apply_rotary)
    ops = forward_ops + backward_ops
    assert on_complex_numbers(ops), [(tuple(t.dtype for t in inputs), o.dtype) for inputs, o in ops]
    assert len(forward_ops) == 1 and len(products(forward_ops)) == 1
    assert len(products(backward_ops)) == 1 and len(backward_ops) <= 2  # + the conjugate's copy


def test_compiled_rotary_is_fused_code_with_the_eager_values():
    """Compiled, RoPE is written out: inductor generated no code for the complex product, so
    view_as_complex, the product and view_as_real ran as aten calls between its kernels, each
    through memory (gpu_check's compiled 373M step runs it 24 times a step). Compiled output and
    input gradient equal eager's, and no aten call on complex numbers is left in the code."""
    from torch._inductor.utils import run_and_get_code

    from pretrain.model.transformer import apply_rotary, rotary_frequencies

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    freqs = rotary_frequencies(8, 12, 10000.0)[3:12]
    x = torch.randn(2, 9, 3, 8, generator=g, requires_grad=True)
    grad = torch.randn(2, 9, 3, 8, generator=g)

    def rotate_and_grad(rotate):
        out = rotate(x, freqs)
        return out, torch.autograd.grad(out, x, grad)[0]

    (out, dx), code = run_and_get_code(lambda: rotate_and_grad(torch.compile(apply_rotary)))
    want, dx_want = rotate_and_grad(apply_rotary)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dx, dx_want, rtol=1e-6, atol=1e-6)
    code = "\n".join(code)
    assert "view_as_complex" not in code and "view_as_real" not in code, code
