"""Config loading and validation: every shipped config loads; bad keys and values are named."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from pretrain.config import RunConfig, check_runtime, load_config, save_config, validate
from pretrain.model import ConfigError, MemoryPlus, Transformer, ValueTable


def config_files(repo_root):
    return sorted((repo_root / "configs").glob("*.yaml"))


def test_every_shipped_config_loads_and_builds_on_meta(repo_root):
    paths = config_files(repo_root)
    assert {"tiny.yaml", "tiny_dense.yaml", "memory_373m.yaml", "smf_1p3b.yaml"} <= {p.name for p in paths}
    for path in paths:
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig)
        with torch.device("meta"):
            Transformer(cfg.model)


def test_overrides_are_typed_and_applied(repo_root):
    cfg = load_config(
        repo_root / "configs/tiny.yaml", ["model.memory.k=8", "optim.lr=1e-3", "model.memory.layers=[0,3]"]
    )
    assert cfg.model.memory.k == 8 and cfg.optim.lr == 1e-3 and cfg.model.memory.layers == [0, 3]
    assert isinstance(cfg.optim.lr, float)


def test_save_and_load_round_trip(repo_root, tmp_path):
    cfg = load_config(repo_root / "configs/tiny.yaml", ["model.memory.layers=[1,2]", "train.max_steps=7"])
    out = tmp_path / "config.yaml"
    save_config(cfg, out)
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind
    assert dataclasses.asdict(load_config(out)) == dataclasses.asdict(cfg)


@pytest.mark.parametrize(
    "override,unknown,suggestion",
    [
        ("model.memory.n_key=3", "model.memory.n_key", "model.memory.n_keys"),
        ("model.dimm=64", "model.dimm", "model.dim"),
        ("trian.max_steps=3", "trian", "train"),
        ("optim.zzzzzz=1", "optim.zzzzzz", None),
    ],
)
def test_unknown_override_key_suggests_the_nearest_valid_key(repo_root, override, unknown, suggestion):
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs/tiny.yaml", [override])
    message = str(err.value)
    assert f"unknown config key '{unknown}'" in message
    if suggestion:
        assert f"did you mean '{suggestion}'" in message


def test_unknown_key_in_a_yaml_file_suggests_the_nearest_valid_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  dim: 64\n  memory:\n    heds: 2\n")
    with pytest.raises(ConfigError, match=r"model\.memory\.heds.*did you mean 'model\.memory\.heads'"):
        load_config(path)


@pytest.mark.parametrize(
    "override,key",
    [
        ("model.dim=abc", "model.dim"),
        ("model.tie_embeddings=maybe", "model.tie_embeddings"),
        ("train.dtype=fp8", "train.dtype"),
        ("model.memory.kernel=cuda", "model.memory.kernel"),
        ("train.zero_stage=4", "train.zero_stage"),
        ("data.seq_len=4096", "data.seq_len"),
        ("model.n_layers=0", "model.n_layers"),
        ("optim.value_optimizer=sgd", "optim.value_optimizer"),
        ("train.max_skipped_steps=-1", "train.max_skipped_steps"),  # was accepted (stopped at the first skip)
        ("slots.sample_batches=-3", "slots.sample_batches"),  # was a traceback after the engine was built
    ],
)
def test_bad_values_name_their_key(repo_root, override, key):
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs/tiny.yaml", [override])
    assert key in str(err.value)


def test_malformed_override_and_missing_file_are_explained(repo_root, tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(repo_root / "configs/tiny.yaml", ["model.dim"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_a_mistyped_config_path_names_the_config_it_meant(repo_root, tmp_path, monkeypatch):
    # The message named configs/tiny.yaml whatever was meant (`--config configs/smf_1p3.yaml`).
    monkeypatch.chdir(repo_root)
    with pytest.raises(
        ConfigError, match=r"configs/smf_1p3\.yaml does not exist: did you mean --config configs/smf_1p3b\.yaml\?"
    ):
        load_config("configs/smf_1p3.yaml")
    with pytest.raises(ConfigError, match=r"did you mean --config configs/memory_373m\.yaml\?"):
        load_config("configs/memory_373.yaml")
    with pytest.raises(ConfigError, match=r"config file configs is a folder \(the YAML files in configs: .*tiny\.yaml"):
        load_config("configs")
    with pytest.raises(ConfigError, match=r"does not exist \(pass --config configs/tiny\.yaml"):
        load_config(tmp_path / "no-folder" / "x.yaml")


INVALID_SHAPES = [  # (overrides on configs/tiny.yaml, the key the message must name)
    (["model.memory.k=129"], "model.memory.k="),  # k > n_keys (128)
    (["model.memory.k_dim=63"], "model.memory.k_dim"),
    (["model.memory.layers=[4]"], "model.memory.layers"),  # 4 layers: indices 0..3
    (["model.memory.layers=[-1]"], "model.memory.layers"),
    (["model.memory.layers=[1,1]"], "model.memory.layers"),
    (["model.memory.v_dim=96", "model.memory.parallel_size=5"], "model.memory.parallel_size"),
    (["model.memory.v_dim=-8"], "model.memory.v_dim"),
    (["model.memory.n_keys=0"], "model.memory.n_keys"),
    (["model.n_heads=3"], "model.n_heads"),  # 128 % 3
    (["model.n_kv_heads=3"], "model.n_kv_heads"),
    # these built nothing (a negative dimension, a division by zero) or a wrong width
    (["model.n_kv_heads=-2"], "model.n_kv_heads=-2 must be >= 0"),
    (["model.ffn_hidden=-8"], "model.ffn_hidden=-8 must be >= 0"),
    (["model.multiple_of=0"], "model.multiple_of=0 must be positive"),
    (["model.multiple_of=-32"], "model.multiple_of=-32 must be positive"),
]


@pytest.mark.parametrize("overrides,key", INVALID_SHAPES)
def test_invalid_shapes_name_the_config_key(repo_root, overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs/tiny.yaml", overrides)
    assert key in str(err.value)


def test_model_validation_runs_before_any_allocation(make_model_config):
    # 2**20 half-keys would be a 2**40-row value table: the shape error must come first
    cfg = make_model_config(memory=dict(n_keys=2**20, k_dim=7))
    with pytest.raises(ConfigError, match="model.memory.k_dim=7"):
        Transformer(cfg)


def test_value_table_width_must_match_the_memory_layer(make_model_config):
    cfg = make_model_config(memory=dict(v_dim=16))
    layer = MemoryPlus(cfg)
    wrong = ValueTable(cfg.memory.num_slots, 24)
    with pytest.raises(ConfigError, match=r"model\.memory\.v_dim=16") as err:
        layer(torch.randn(1, 3, cfg.dim), wrong)
    assert "24" in str(err.value)


def test_memory_parallel_size_must_divide_the_world_size(repo_root):
    cfg = load_config(repo_root / "configs/tiny.yaml", ["train.micro_batch=4", "train.global_batch=48"])
    cfg.model.memory.parallel_size = 2
    check_runtime(cfg, world_size=4)
    with pytest.raises(ConfigError, match="model.memory.parallel_size=2"):
        check_runtime(cfg, world_size=3)


@pytest.mark.parametrize("parallel, world, fits", [(2, 1, 1), (2, 3, 1), (4, 6, 3), (8, 4, 4)])
def test_a_memory_parallel_size_that_does_not_divide_the_world_names_one_that_does(repo_root, parallel, world, fits):
    """Resuming a parallel_size=2 run on one process said only `must divide the world size 1`; the
    refusal now names the largest parallel_size up to the asked one that divides the world (the
    checkpoint re-shards to it) and the launch that keeps the asked one."""
    cfg = load_config(repo_root / "configs/tiny.yaml", [f"train.micro_batch={96 // world}", "train.global_batch=96"])
    cfg.model.memory.parallel_size = parallel
    with pytest.raises(ConfigError) as err:
        check_runtime(cfg, world_size=world)
    assert str(err.value) == (
        f"model.memory.parallel_size={parallel} must divide the world size {world}: set "
        f"model.memory.parallel_size={fits} (a checkpoint re-shards to any parallel_size), or launch a multiple "
        f"of {parallel} ranks"
    )


@pytest.mark.parametrize(
    "key, value, allowed",
    [
        ("train.dtype", "fp8", "fp32, bf16 or fp16"),
        ("train.nan_policy", "ignore", "stop or skip"),
        ("optim.value_lr_schedule", "linear", "follow, constant or cosine"),
        ("optim.value_optimizer", "sgd", "adamw, sparse_adamw or sparse_rowwise_adamw"),
        ("data.on_corrupt", "warn", "error or skip"),
        ("model.memory.kernel", "cuda", "auto, triton or torch"),
    ],
)
def test_a_string_choice_outside_its_literal_names_key_value_and_choices(repo_root, key, value, allowed):
    message = rf"{key}='{value}' must be {allowed}$"
    with pytest.raises(ConfigError, match=message):  # from the YAML/override (OmegaConf checks the Literal)
        load_config(repo_root / "configs/tiny.yaml", [f"{key}={value}"])
    cfg = load_config(repo_root / "configs/tiny.yaml")
    section, name = key.rsplit(".", 1)
    setattr(_section(cfg, section), name, value)
    with pytest.raises(ConfigError, match=message):  # set in code: validate checks the annotation
        validate(cfg)


def _section(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize(
    "key,value",
    [
        (key, value)
        for key, values in {
            "optim.beta1": [1.5, 1.0, -0.1, float("nan"), 0.0, 0.9],
            "optim.beta2": [1.0, -1.0, float("nan"), 0.95],
            "optim.eps": [-1e-8, float("nan"), float("inf"), 0.0, 1e-8],
            "optim.weight_decay": [-1.0, float("nan"), float("inf"), 0.0, 0.1],
            "optim.lr": [-1.0, float("nan"), float("inf"), 0.0, 3e-3],
            "optim.value_lr": [float("nan"), float("inf"), 1e-3],
        }.items()
        for value in values
    ],
)
def test_optimizer_settings_are_checked_at_load_as_adamw_would(repo_root, key, value):
    """What torch's AdamW refuses (after data preparation and the model build: a raw ValueError
    traceback) is refused by load_config, naming the key; non-finite values, which AdamW takes but
    which turn the weights into NaN at the first step, too. The reference is AdamW itself."""
    o = load_config(repo_root / "configs/tiny.yaml").optim
    setattr(o, key.split(".")[1], value)
    reference_ok = all(math.isfinite(v) for v in (o.lr, o.value_lr, o.eps, o.weight_decay))
    for lr, decay in ((o.lr, o.weight_decay), (o.value_lr, 0.0)):
        try:
            torch.optim.AdamW(
                [torch.zeros(2, requires_grad=True)], lr=lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=decay
            )
        except ValueError:
            reference_ok = False
    text = repr(value) if math.isfinite(value) else {"nan": ".nan", "inf": ".inf"}[str(value)]
    if reference_ok:
        assert (
            getattr(load_config(repo_root / "configs/tiny.yaml", [f"{key}={text}"]).optim, key.split(".")[1]) == value
        )
    else:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(repo_root / "configs/tiny.yaml", [f"{key}={text}"])


def test_a_global_batch_micro_batch_does_not_divide_names_a_value_that_works(repo_root):
    """The message said only 'not divisible'; it now gives a global batch the config accepts."""
    with pytest.raises(ConfigError) as err:
        load_config(repo_root / "configs/tiny.yaml", ["train.global_batch=15", "train.micro_batch=4"])
    suggested = re.search(r"e\.g\. (train\.global_batch=\d+)", str(err.value))
    assert suggested, err.value
    cfg = load_config(repo_root / "configs/tiny.yaml", [suggested.group(1), "train.micro_batch=4"])
    assert cfg.train.global_batch == 16
