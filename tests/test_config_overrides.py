"""`key=value` overrides: a string-typed key (paths, names, choices) takes the text after '=' as
it stands, where YAML would have cut a comment, read a number or a boolean, or failed; every
other key is still read as YAML. An OmegaConf interpolation is refused, naming the override."""

from __future__ import annotations

import os

import pytest

from pretrain.config import ConfigError, load_config, save_config

# What YAML made of them: '/tmp/a', 83, True, True, 202401, 1000.0, None, a mapping, an error,
# 'quoted', 'dq', an error, None, 31.
TEXTS = ["/tmp/a #b", "0123", "yes", "on", "2024_01", "1e3", "null", "/tmp/x: y", "!tag"]
TEXTS += ["runs/a b", "'quoted'", '"dq"', "*alias", "~", "0x1F", "runs/[0, 1]", "C:\\runs\\a"]


@pytest.mark.parametrize("text", TEXTS)
def test_a_string_key_takes_the_text_as_it_stands_and_keeps_it_when_saved(text, tmp_path):
    overrides = [f"train.run_dir={text}", f"data.cache_dir={text}", f"train.init_from={text}"]
    cfg = load_config(None, overrides)
    if text.startswith("~"):  # not YAML's null: a path under the home directory (expand_home)
        text = os.path.expanduser(text)
    assert (cfg.train.run_dir, cfg.data.cache_dir, cfg.train.init_from) == (text, text, text)
    save_config(cfg, tmp_path / "config.yaml")  # what the job reads back
    again = load_config(tmp_path / "config.yaml")
    assert (again.train.run_dir, again.data.cache_dir, again.train.init_from) == (text, text, text)


def test_an_empty_string_value_is_the_empty_string():
    assert load_config(None, ["train.init_from="]).train.init_from == ""


def test_a_choice_is_checked_as_typed():
    assert load_config(None, ["train.dtype=bf16"]).train.dtype == "bf16"
    with pytest.raises(ConfigError, match=r"train.dtype='yes' must be fp32, bf16 or fp16$"):
        load_config(None, ["train.dtype=yes"])  # YAML's True, before


def test_granularity_keeps_its_text():
    assert load_config(None, ["slots.granularity=chunk:64"]).slots.granularity == "chunk:64"
    with pytest.raises(ConfigError, match=r"slots.granularity='0123' must be document"):
        load_config(None, ["slots.granularity=0123"])  # '83', before


def test_other_keys_are_still_read_as_yaml():
    cfg = load_config(
        None,
        [
            "optim.lr=1e-3",
            "train.seed=7",
            "train.compile=yes",
            "model.memory.layers=[0, 3]",
            "train.activation_checkpointing_layers=[1]",
            "train.activation_checkpointing=selective",
            "train={max_steps: 40, run_dir: '/tmp/r #1'}",  # a whole section is a YAML mapping
        ],
    )
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.seed == 7 and cfg.train.compile is True
    assert cfg.model.memory.layers == [0, 3] and cfg.train.activation_checkpointing_layers == [1]
    assert cfg.train.max_steps == 40 and cfg.train.run_dir == "/tmp/r #1"


def test_the_last_override_of_a_key_wins():
    cfg = load_config(None, ["train.run_dir=a", "train.seed=1", "train.run_dir=b #2", "train.seed=2"])
    assert (cfg.train.run_dir, cfg.train.seed) == ("b #2", 2)


@pytest.mark.parametrize("text", ["${oc.env:HOME}/x", "runs/${nope}", "${train.seed}", "???"])
def test_an_interpolation_or_missing_marker_is_refused_naming_the_override(text):
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train.run_dir={text}"])
    message = str(err.value)
    assert message.startswith(f"override 'train.run_dir={text}': OmegaConf would read {text!r}")
    assert "write the value itself" in message
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=\$\{x\}'"):
        load_config(None, ["optim.lr=${x}"])
