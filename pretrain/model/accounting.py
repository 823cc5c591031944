"""Parameter counts and FLOPs per token, split into dense and memory parts.

FLOPs count multiply-adds as 2 and backward as twice the forward (so training is 3x
forward), the convention behind MFU. Per token, forward:
  dense matmuls: 2 * (attention projections + SwiGLU FFNs + output layer) params
  attention scores: 2 * 2 * seq_len * dim per layer (QK^T and AV, causal mask not discounted)
  memory layer: query projection 2*dim*H*k_dim, half-key scoring 2*H*n_keys*k_dim,
                bag 2*H*k*v_dim, gate 2*dim*v_dim, output 2*v_dim*dim.
The value table is sparse: a token touches H*k of its N rows, so its parameters do not
count as active.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pretrain.model.config import ModelConfig

if TYPE_CHECKING:  # only annotations name it: the counts of a config (run plans, model-info) load no torch
    import torch.nn as nn


@dataclass
class ParameterCount:
    dense: int  # everything but the memory layers' own parameters
    memory_values: int  # value tables
    memory_keys: int  # product half-keys
    memory_other: int  # query projections, query norms, gates, output projections

    @property
    def total(self) -> int:
        return self.dense + self.memory_values + self.memory_keys + self.memory_other

    @property
    def active(self) -> int:
        """Parameters every token uses (values excluded: each token reads H*k rows)."""
        return self.dense + self.memory_keys + self.memory_other


def count_parameters(model: nn.Module) -> ParameterCount:
    """Count a built model's parameters (works on the meta device; tied weights once)."""
    counts = {"dense": 0, "memory_values": 0, "memory_keys": 0, "memory_other": 0}
    for name, p in model.named_parameters():  # named_parameters de-duplicates tied weights
        if name.startswith("values."):
            counts["memory_values"] += p.numel()
        elif name.endswith(".keys1") or name.endswith(".keys2"):
            counts["memory_keys"] += p.numel()
        elif ".ffn." in name and _is_memory_param(model, name):
            counts["memory_other"] += p.numel()
        else:
            counts["dense"] += p.numel()
    return ParameterCount(**counts)


def _is_memory_param(model: nn.Module, name: str) -> bool:
    layer_id = int(name.split(".")[1])
    return layer_id in model.cfg.memory.layers


def config_parameters(cfg: ModelConfig) -> ParameterCount:
    """`count_parameters(Transformer(cfg))` from the config alone, without building the model (and
    importing torch): the run plan that memlayers-submit prints. Mirrors the modules of
    pretrain/model/transformer.py and memory.py; tests/model/test_accounting.py holds the two equal."""
    m, d, L = cfg.memory, cfg.dim, cfg.n_layers
    memory_layers = len(m.layers)
    norms = 2 * d  # attention_norm, ffn_norm
    dense = L * (_attention_params(cfg) + norms) + (L - memory_layers) * 3 * d * cfg.hidden_dim  # SwiGLU w1 w2 w3
    dense += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d  # embeddings, output layer, final norm
    v, half = cfg.value_dim, m.k_dim // 2
    per_memory_layer = d * m.heads * m.k_dim + (half if m.qk_norm else 0) + 2 * d * v  # query proj + norm, W1, W2
    return ParameterCount(
        dense=dense,
        memory_values=m.num_value_tables * m.num_slots * v,
        memory_keys=memory_layers * 2 * m.heads * m.n_keys * half,
        memory_other=memory_layers * per_memory_layer,
    )


def _attention_params(cfg: ModelConfig) -> int:
    """wq, wo, wk, wv of one attention layer."""
    return cfg.dim * cfg.n_heads * cfg.head_dim * 2 + cfg.dim * cfg.kv_heads * cfg.head_dim * 2


@dataclass(frozen=True)
class LayerKind:
    """One kind of sublayer: how many the model has and its training FLOPs per token each."""

    name: str
    count: int
    flops_per_token: float  # forward + backward, one layer of this kind


def layer_kinds(cfg: ModelConfig, seq_len: int) -> list[LayerKind]:
    """The model as sublayer kinds (attention, SwiGLU FFN, memory, output head), whose
    count x FLOPs sum to `flops_per_token`'s total; tools/bench_kernels.py --layer times each
    kind to say where a step's time goes."""
    m, d, L = cfg.memory, cfg.dim, cfg.n_layers
    attn_params = _attention_params(cfg)
    kinds = [
        LayerKind("attention", L, 3.0 * (2 * attn_params + 2 * 2 * seq_len * d)),
        LayerKind("ffn", L - len(m.layers), 3.0 * 2 * 3 * d * cfg.hidden_dim),
        LayerKind("output_head", 1, 3.0 * 2 * d * cfg.vocab_size),
    ]
    if m.layers:
        v = cfg.value_dim
        per_layer = 2 * d * m.heads * m.k_dim + 2 * m.heads * m.n_keys * m.k_dim
        per_layer += 2 * m.heads * m.k * v + 2 * d * v + 2 * v * d
        kinds.append(LayerKind("memory", len(m.layers), 3.0 * per_layer))
    return kinds


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Training FLOPs per token (forward + backward), split into dense and memory parts."""
    kinds = layer_kinds(cfg, seq_len)
    memory = sum(k.count * k.flops_per_token for k in kinds if k.name == "memory")
    dense = sum(k.count * k.flops_per_token for k in kinds if k.name != "memory")
    return {"dense": float(dense), "memory": float(memory), "total": float(dense + memory)}


def human_count(n: float, fmt: str = ".3g", billion: str = "G") -> str:
    """A count with its unit prefix: 1.82M parameters, 7.03G FLOPs (`fmt` formats the mantissa)."""
    for unit, size in (("T", 1e12), (billion, 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:{fmt}}{unit}"
    return f"{n:g}"
