"""A whole MemoryPlus layer through the Triton kernels equals the torch path."""

from __future__ import annotations

import copy

import torch

from kernel_checks import FP32_TOL, assert_close
from pretrain.model.memory import MemoryPlus, ValueTable


def test_memory_layer_triton_matches_torch(make_model_config, device):
    torch.manual_seed(0)
    cfg = make_model_config(dim=24, memory=dict(n_keys=12, heads=2, k=5, k_dim=16, kernel="torch"))
    layer_torch = MemoryPlus(cfg).to(device)
    table_torch = ValueTable(cfg.memory.num_slots, cfg.value_dim, kernel="torch").to(device)
    layer_triton, table_triton = copy.deepcopy(layer_torch), copy.deepcopy(table_torch)
    layer_triton.kernel, table_triton.kernel = "triton", "triton"
    x = torch.randn(2, 8, cfg.dim, device=device)
    outs, grads = [], []
    for layer, table in ((layer_torch, table_torch), (layer_triton, table_triton)):
        xi = x.clone().requires_grad_()
        out = layer(xi, table)
        out.square().sum().backward()
        outs.append((out, layer.last_indices))
        grads.append([xi.grad] + [p.grad for p in layer.parameters()] + [table.weight.grad])
    assert torch.equal(outs[0][1], outs[1][1]), "different slots selected"
    assert_close(outs[1][0], outs[0][0], FP32_TOL, "memory layer output")
    names = ["x"] + [n for n, _ in layer_torch.named_parameters()] + ["values"]
    for name, want, got in zip(names, *grads):
        assert_close(got, want, FP32_TOL, f"gradient of {name}")
