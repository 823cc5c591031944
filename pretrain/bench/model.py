"""The small model the value-pool and memory-parallel benchmarks build (`parallel`, `values`)."""

from __future__ import annotations

from pretrain.model.config import MemoryConfig, ModelConfig


def memory_model_config(
    *, dim: int, n_layers: int, seq_len: int, n_keys: int, heads: int, k: int, k_dim: int, v_dim: int = 0
) -> ModelConfig:
    """A 512-token vocabulary, 4 attention heads and one memory layer, in the last block, on the
    PyTorch kernels (`n_keys`**2 slots; `v_dim` 0: the model's width)."""
    memory = MemoryConfig(
        layers=[n_layers - 1], n_keys=n_keys, heads=heads, k=k, k_dim=k_dim, v_dim=v_dim, kernel="torch"
    )
    return ModelConfig(
        vocab_size=512, dim=dim, n_layers=n_layers, n_heads=4, max_seq_len=seq_len, memory=memory
    ).validate()
