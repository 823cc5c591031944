"""train.activation_checkpointing / train.compile: bad values are refused by load_config
with the key and the fix named, before anything is built."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, check_runtime, load_config


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.activation_checkpointing=all"], "must be none, full, memory or selective"),
        (["train.activation_checkpointing_layers=[0]"], "only read with train.activation_checkpointing=selective"),
        (
            ["train.activation_checkpointing=selective", "train.activation_checkpointing_layers=[4]"],
            r"names blocks \[4\] outside 0..3",
        ),
    ],
)
def test_bad_checkpointing_settings_are_refused(repo_root, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_runtime(load_config(repo_root / "configs/tiny.yaml", overrides), world_size=1, device_type="cpu")


def test_defaults_and_a_valid_selection_pass(repo_root):
    cfg = load_config(repo_root / "configs/tiny.yaml")
    assert (cfg.train.activation_checkpointing, cfg.train.compile) == ("none", False)
    check_runtime(
        load_config(
            repo_root / "configs/tiny.yaml",
            [
                "train.activation_checkpointing=selective",
                "train.activation_checkpointing_layers=[1,3]",
                "train.compile=true",
            ],
        ),
        world_size=1,
        device_type="cpu",
    )
