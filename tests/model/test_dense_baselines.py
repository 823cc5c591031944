"""Each paper-scale config's dense baseline has the same active parameters (built on meta)."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.model import Transformer, count_parameters


@pytest.mark.parametrize("name", ["memory_373m", "smf_1p3b"])
def test_dense_baseline_has_equal_active_parameters(repo_root, name):
    def counts(config):
        with torch.device("meta"):
            return count_parameters(Transformer(load_config(repo_root / f"configs/{config}.yaml").model))

    memory, dense = counts(name), counts(f"{name}_dense")
    assert memory.memory_values > 0 and dense.memory_values == dense.memory_keys == dense.memory_other == 0
    assert abs(dense.active - memory.active) <= 1e-3 * memory.active
    memory_cfg = load_config(repo_root / f"configs/{name}.yaml")
    dense_cfg = load_config(repo_root / f"configs/{name}_dense.yaml")
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len"):
        assert getattr(dense_cfg.model, key) == getattr(memory_cfg.model, key), key
    assert dense_cfg.train.global_batch == memory_cfg.train.global_batch
    assert dense_cfg.data.seq_len == memory_cfg.data.seq_len
