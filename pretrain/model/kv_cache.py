"""Key/value cache for incremental decoding with `Transformer.forward(tokens, cache=...)`.

One `LayerKV` per block holds that block's rotated keys and values, (B, kv_heads, length,
head_dim); the cache's length is the position of the next token, shared by every row (the
training model has no padding masks: a batch of prompts must have equal lengths).
"""

from __future__ import annotations

import torch


class LayerKV:
    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's keys/values (B, kv_heads, S, head_dim); return all of them."""
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = torch.cat([self.keys, keys], dim=2)
            self.values = torch.cat([self.values, values], dim=2)
        return self.keys, self.values


class KVCache:
    def __init__(self, n_layers: int) -> None:
        self.layers = [LayerKV() for _ in range(n_layers)]
        self.length = 0  # tokens already cached

    def causal_mask(self, new_tokens: int, device: torch.device) -> torch.Tensor | None:
        """Boolean (new, length + new) mask for new tokens after the cached ones; None when plain
        is_causal (nothing cached) or no mask (one new token sees everything) is exact."""
        if self.length == 0 or new_tokens == 1:
            return None
        query = torch.arange(self.length, self.length + new_tokens, device=device)[:, None]
        return torch.arange(self.length + new_tokens, device=device)[None, :] <= query
