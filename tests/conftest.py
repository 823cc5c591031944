"""Shared test fixtures: the repository root and small model configurations."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pretrain.model.config import MemoryConfig, ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def make_model_config():
    """Factory for a small, valid ModelConfig; keyword overrides, `memory=dict(...)` for memory fields."""

    def make(memory: dict | None = None, **overrides) -> ModelConfig:
        mem = MemoryConfig(layers=[1], n_keys=8, heads=2, k=3, k_dim=8)
        for key, value in (memory or {}).items():
            setattr(mem, key, copy.deepcopy(value))
        base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32, memory=mem)
        base.update(overrides)
        return ModelConfig(**base)

    return make

