"""Config values that used to fail only after start-up (ZeroDivisionError) or with an
omegaconf traceback are refused when the config loads, naming the key and the fix."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config


@pytest.mark.parametrize("key", ["train.log_every", "train.eval_every", "train.checkpoint_every", "slots.log_every"])
@pytest.mark.parametrize("value", [0, -3])
def test_cadence_below_one_is_refused(key, value):
    with pytest.raises(ConfigError, match=rf"{key}={value} must be >= 1"):
        load_config(None, [f"{key}={value}"])


def test_keeping_no_checkpoint_is_refused():
    with pytest.raises(ConfigError, match="train.keep_checkpoints=0 would delete every checkpoint"):
        load_config(None, ["train.keep_checkpoints=0"])
    assert load_config(None, ["train.keep_checkpoints=1"]).train.keep_checkpoints == 1


def test_yaml_list_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match=rf"{path.name} holds a YAML list, not a mapping"):
        load_config(path)
