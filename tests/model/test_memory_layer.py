"""Memory+ layer: forward against an independent float64 implementation, gradients everywhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.model import MemoryPlus, Transformer, ValueTable, language_model_loss


class LayerWithTable(nn.Module):
    """One memory layer and the value table it reads, as a single module for functional_call."""

    def __init__(self, layer: MemoryPlus, values: ValueTable):
        super().__init__()
        self.layer, self.values = layer, values

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, self.values)


def memory_plus_float64(x: torch.Tensor, layer: MemoryPlus, table: torch.Tensor, norm_eps: float):
    """Memory+ written out: query, (qk-norm), scores of all N slots, exact top-k, softmax, bag, gate.

    Returns (output (B, S, dim), weights (T, H, k), indices (T, H, k)).
    """
    d = lambda t: t.detach().double()  # noqa: E731
    H, k, n, half = layer.heads, layer.k, layer.n_keys, layer.k_dim // 2
    xs = d(x).reshape(-1, x.shape[-1])
    q = (xs @ d(layer.query_proj.weight).T).reshape(-1, H, 2, half)
    keys1, keys2 = d(layer.keys1), d(layer.keys2)
    if layer.qk_norm:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + norm_eps) * d(layer.query_norm.weight)
        key_eps = torch.finfo(torch.float32).eps  # F.rms_norm's default for the fp32 model
        keys1 = keys1 * torch.rsqrt(keys1.pow(2).mean(-1, keepdim=True) + key_eps)
        keys2 = keys2 * torch.rsqrt(keys2.pow(2).mean(-1, keepdim=True) + key_eps)
    s1 = torch.einsum("thd,hnd->thn", q[:, :, 0], keys1)
    s2 = torch.einsum("thd,hnd->thn", q[:, :, 1], keys2)
    all_scores = (s1[..., :, None] + s2[..., None, :]).reshape(xs.shape[0], H, n * n)
    order = all_scores.argsort(dim=-1, descending=True)[..., :k]
    top = all_scores.gather(-1, order)
    weights = torch.exp(top - top.max(-1, keepdim=True).values)
    weights = weights / weights.sum(-1, keepdim=True)
    bag = (weights[..., None] * d(table)[order]).sum(dim=(1, 2))
    gate = xs @ d(layer.gate_proj.weight).T
    out = (bag * gate * torch.sigmoid(gate)) @ d(layer.out_proj.weight).T
    return out.reshape(*x.shape[:-1], -1), weights, order


@pytest.mark.parametrize("qk_norm", [True, False])
def test_memory_plus_matches_float64_implementation(make_model_config, qk_norm):
    torch.manual_seed(0)
    cfg = make_model_config(dim=16, memory=dict(n_keys=10, heads=3, k=4, k_dim=12, v_dim=20, qk_norm=qk_norm))
    layer = MemoryPlus(cfg)
    table = ValueTable(cfg.memory.num_slots, cfg.value_dim)
    x = torch.randn(2, 5, 16)
    out = layer(x, table)
    want, want_w, want_i = memory_plus_float64(x, layer, table.weight, cfg.norm_eps)
    assert out.shape == (2, 5, 16)
    torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-5)
    # the selection of the last forward is exposed, detached, on the model's device
    assert layer.last_indices.shape == layer.last_weights.shape == (10, 3, 4)
    assert not layer.last_indices.requires_grad and not layer.last_weights.requires_grad
    assert torch.equal(layer.last_indices.sort(-1).values, want_i.sort(-1).values)
    torch.testing.assert_close(layer.last_weights.double().sort(-1).values, want_w.sort(-1).values, rtol=0, atol=1e-6)


def selection_margin(layer: MemoryPlus, x: torch.Tensor) -> float:
    """Smallest score gap at the boundaries that decide the selection (both halves, candidates)."""
    k = layer.k
    with torch.no_grad():
        q = layer.query_proj(x).reshape(-1, layer.heads, 2, layer.k_dim // 2)
        keys1, keys2 = layer.keys1, layer.keys2
        if layer.qk_norm:
            q = layer.query_norm(q)
            keys1, keys2 = F.rms_norm(keys1, (keys1.shape[-1],)), F.rms_norm(keys2, (keys2.shape[-1],))
        s1 = torch.einsum("thd,hnd->thn", q[:, :, 0], keys1).sort(-1, descending=True).values
        s2 = torch.einsum("thd,hnd->thn", q[:, :, 1], keys2).sort(-1, descending=True).values
        cand = (s1[..., :k, None] + s2[..., None, :k]).flatten(-2).sort(-1, descending=True).values
        gaps = [s1[..., k - 1] - s1[..., k], s2[..., k - 1] - s2[..., k], cand[..., k - 1] - cand[..., k]]
    return min(g.min().item() for g in gaps)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_memory_plus_gradcheck_float64(make_model_config, qk_norm):
    """Gradients reach the values, keys, query projection (and norm), gate and output projection."""
    cfg = make_model_config(dim=6, memory=dict(n_keys=4, heads=2, k=2, k_dim=4, qk_norm=qk_norm))
    for seed in range(50):  # draw until the top-k selection is far from any tie
        torch.manual_seed(seed)
        layer = MemoryPlus(cfg).double()
        table = ValueTable(cfg.memory.num_slots, cfg.value_dim).double()
        x = torch.randn(1, 3, 6, dtype=torch.float64)
        if selection_margin(layer, x) > 0.01:  # perturbations (eps=1e-6) move scores by ~1e-6
            break
    else:
        raise AssertionError("no draw with a well-separated selection")
    module = LayerWithTable(layer, table)
    names = [name for name, _ in module.named_parameters()]
    assert {
        "layer.query_proj.weight",
        "layer.keys1",
        "layer.keys2",
        "layer.gate_proj.weight",
        "layer.out_proj.weight",
        "values.weight",
    } <= set(names)
    params = tuple(p.detach().clone().requires_grad_() for p in module.parameters())

    def fn(x, *tensors):
        return torch.func.functional_call(module, dict(zip(names, tensors)), (x,))

    assert torch.autograd.gradcheck(fn, (x.requires_grad_(),) + params, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("shared_values,tie_embeddings", [(True, False), (False, True)])
def test_every_parameter_of_a_memory_transformer_gets_a_gradient(make_model_config, shared_values, tie_embeddings):
    torch.manual_seed(0)
    cfg = make_model_config(
        n_layers=3, tie_embeddings=tie_embeddings, memory=dict(layers=[0, 2], shared_values=shared_values)
    )
    model = Transformer(cfg)
    assert len(model.values) == (1 if shared_values else 2)
    assert len(model.memory_layers()) == 2
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
        assert torch.isfinite(p.grad).all(), name
