"""The transformers config of an export: "model" is the one source of the model's settings."""

from __future__ import annotations

import json

import pytest

from pretrain.hf.configuration_memlayers import MemlayersConfig

MODEL = {"dim": 64, "n_heads": 4, "max_seq_len": 128, "vocab_size": 96, "memory": {"layers": [1], "n_keys": 16}}


def saved_config(tmp_path) -> dict:
    MemlayersConfig(model=MODEL).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_editing_model_after_save_pretrained_changes_the_model(tmp_path):
    """Until 2026-12-07 save_pretrained wrote every derived setting (max_seq_len, dim, head_dim,
    memory_n_keys...) beside "model" and a reload took those copies: an edited "model" was ignored."""
    raw = saved_config(tmp_path)
    assert "max_seq_len" not in raw and "memory_n_keys" not in raw and "head_dim" not in raw
    raw["model"]["rope_theta"] = 500000.0
    raw["model"]["memory"]["n_keys"] = 32
    (tmp_path / "config.json").write_text(json.dumps(raw))
    got = MemlayersConfig.from_pretrained(tmp_path)
    assert (got.rope_theta, got.memory_n_keys, got.head_dim) == (500000.0, 32, 16)


def test_a_top_level_copy_that_disagrees_with_model_is_refused_naming_it(tmp_path):
    raw = saved_config(tmp_path)
    raw["model"]["max_seq_len"] = 512  # max_position_embeddings (transformers' name) still says 128
    raw["memory_n_keys"] = 16  # as a config saved before 2026-12-07 holds it, now disagreeing
    raw["model"]["memory"]["n_keys"] = 32
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        MemlayersConfig.from_pretrained(tmp_path)
    message = str(err.value)
    assert "max_position_embeddings=128 (model gives 512)" in message
    assert "memory_n_keys=16 (model gives 32)" in message
    assert "edit the setting there and remove these top-level copies" in message
    # copies that agree (a config saved before 2026-12-07, unedited) load as before
    raw["max_position_embeddings"], raw["memory_n_keys"] = 512, 32
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert MemlayersConfig.from_pretrained(tmp_path).max_position_embeddings == 512
