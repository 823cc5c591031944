"""A decoder-only transformer (RMSNorm, RoPE, SDPA attention, SwiGLU) with memory layers.

Plain nn.Modules: no process groups, kernels chosen by `kernels`' dispatch, parallelism
applied from outside (pretrain/parallel). Blocks listed in `cfg.memory.layers` use a
`MemoryPlus` layer in place of the FFN; the value tables live on the model in
`self.values` (one shared table, or one per memory layer).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.model.config import ModelConfig
from pretrain.model.document_attention import BlockMask, document_mask, flex_document_attention
from pretrain.model.kv_cache import KVCache, LayerKV
from pretrain.model.memory import MemoryPlus, ValueTable


def rotary_frequencies(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """cos/sin tables of shape (max_seq_len, head_dim // 2, 2)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of x (B, S, heads, head_dim) by the angles in freqs (S, head_dim // 2, 2):
    (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos), in at least fp32 (freqs' dtype).

    As one complex multiplication per pair, which torch vectorises in one kernel forward and
    backward: the same products and sums as the written-out form (selects, four products and a
    stack, ~12 kernels), at the demo's shape 0.18x its CPU time (tools/bench_cpu_paths.py).
    Compiled, it is written out: inductor fuses that into one kernel with the casts around it,
    while it generates no code for complex tensors (view_as_complex, the product and view_as_real
    run as aten calls between its kernels, each through memory)."""
    if torch.compiler.is_compiling():
        xr = x.float().reshape(*x.shape[:-1], -1, 2)
        cos, sin = freqs[:, None, :, 0], freqs[:, None, :, 1]
        out = torch.stack([xr[..., 0] * cos - xr[..., 1] * sin, xr[..., 0] * sin + xr[..., 1] * cos], dim=-1)
        return out.flatten(-2).to(x.dtype)
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * torch.view_as_complex(freqs)[:, None, :]).flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with rotary positions and grouped KV heads (cfg.kv_heads)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(
        self, x: torch.Tensor, freqs: torch.Tensor, kv: LayerKV | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """kv (optional): this layer's cache, extended in place; mask: from `KVCache.causal_mask`, or
        a document mask (`document_attention.document_mask`: boolean for SDPA, or a BlockMask)."""
        B, S, _ = x.shape
        q = apply_rotary(self.wq(x).view(B, S, self.n_heads, self.head_dim), freqs)
        k = apply_rotary(self.wk(x).view(B, S, self.kv_heads, self.head_dim), freqs)
        v = self.wv(x).view(B, S, self.kv_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        causal = True
        if kv is not None:
            causal = kv.keys is None and S > 1  # prefill; later steps: `mask` or one query seeing all
            k, v = kv.extend(k, v)
        gqa = self.kv_heads != self.n_heads
        if isinstance(mask, BlockMask):  # document masking by FlexAttention (document_attention.py)
            out = flex_document_attention(q, k, v, mask, enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal and mask is None, enable_gqa=gqa
            )
        return self.wo(out.transpose(1, 2).reshape(B, S, -1))


class SwiGLU(nn.Module):
    """The dense FFN: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: attention, then the FFN, a `MemoryPlus` layer where `is_memory`
    (reading the value table the model passes in `values`, None for a dense block)."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.is_memory = layer_id in cfg.memory.layers
        self.ffn = MemoryPlus(cfg) if self.is_memory else SwiGLU(cfg.dim, cfg.hidden_dim)

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        values: nn.Module | None,
        kv: LayerKV | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), freqs, kv, mask)
        h = self.ffn_norm(x)
        return x + (self.ffn(h, values) if self.is_memory else self.ffn(h))


class Transformer(nn.Module):
    """The language model: token embeddings, `cfg.n_layers` blocks, final norm and output
    projection (tied to the embeddings under cfg.tie_embeddings), and the value tables
    (`values`) its memory blocks read."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg.validate()
        m = cfg.memory
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.values = nn.ModuleList(
            ValueTable(m.num_slots, cfg.value_dim, m.kernel, seed=i) for i in range(m.num_value_tables)
        )
        # Not a buffer: DeepSpeed's bf16 cast of the module must not round the angles.
        self._freqs: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re-)initialise every weight; also materialises a model built on the meta device."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.RMSNorm):
                module.reset_parameters()
        # values and keys keep their own (the anchor's) initialisation
        for table in self.values:
            table.reset_parameters()
        for layer in self.memory_layers():
            layer.reset_keys()

    def memory_layers(self) -> list[MemoryPlus]:
        return [block.ffn for block in self.layers if block.is_memory]

    def value_table_for(self, memory_index: int) -> nn.Module:
        return self.values[0 if self.cfg.memory.shared_values else memory_index]

    def rotary(self, seq_len: int, device: torch.device) -> torch.Tensor:
        if self._freqs is None or self._freqs.device != device:
            cfg = self.cfg
            self._freqs = rotary_frequencies(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta).to(device)
        return self._freqs[:seq_len]

    def forward(
        self, tokens: torch.Tensor, cache: KVCache | None = None, doc_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, S) int64 -> logits (B, S, vocab). With `cache` (inference), tokens continue
        the cached ones and their keys/values are appended to it. With `doc_ids` (B, S), each
        token attends only to earlier tokens of its own document (pretrain/model/document_attention.py)."""
        S = tokens.shape[1]
        past = cache.length if cache is not None else 0
        if past + S > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {past + S} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (document masking) is for packed training batches, not with a KV cache")
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(
                f"the KV cache has {len(cache.layers)} layers, the model {len(self.layers)}: "
                "build it as KVCache(len(model.layers)) for this model"
            )
        x = self.tok_embeddings(tokens)
        freqs = self.rotary(past + S, x.device)[past:]
        mask = None
        if cache is not None:
            mask = cache.causal_mask(S, x.device)
        elif doc_ids is not None:
            mask = document_mask(doc_ids.to(x.device), self.cfg.document_attention)
        memory_index = 0
        for i, block in enumerate(self.layers):
            values = None
            if block.is_memory:
                values = self.value_table_for(memory_index)
                memory_index += 1
            x = block(x, freqs, values, cache.layers[i] if cache is not None else None, mask)
        if cache is not None:
            cache.length += S
        return self.output(self.norm(x))
