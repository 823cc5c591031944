"""Run configuration: typed dataclasses loaded from YAML with OmegaConf, dot-list overrides.

`load_config("configs/tiny.yaml", ["optim.lr=1e-3"])` returns a validated `RunConfig`.
Unknown keys fail with the nearest valid key; invalid values and combinations fail here,
before any heavy work. No config string is ever evaluated.

Three kinds of checks, so that tools which only read a config need no environment:
- `validate(cfg)`: values and combinations, a pure function of the config (export calls it);
- `check_datasets(cfg)`: the prepared datasets named by data.dir / data.sources exist and
  agree (reads their manifests; `load_config` runs it);
- `check_runtime(cfg, world_size, device_type)`: what depends on where the run starts (world
  size, device, kernels available; a row for each of ranks x data.num_workers); the trainer
  and tools/submit call it; `check_world(cfg, world_size)`, its part without the device, comes
  before torch at a rank's start.

One concern per module: `schema.py` (the dataclasses), `loading.py` (file and override layers,
key checks, merging), `paths.py` (~, shell variables, absolute paths), `datasets.py` (values
taken from and checks against the prepared datasets), `validation.py` (`validate`), `runtime.py`
(`check_runtime`), `differences.py` (comparing two configs), `saving.py` (YAML and dict out).
This package's namespace re-exports their public names, the import path callers use.
"""

from pretrain.config.datasets import DATASET_KEYS, check_datasets, follow_dataset
from pretrain.config.differences import MODEL_RUNTIME_KEYS, config_differences, model_differences
from pretrain.config.loading import load_config, override_value
from pretrain.config.paths import absolute_paths, expand_home
from pretrain.config.runtime import check_runtime, check_world
from pretrain.config.saving import config_to_dict, config_yaml, save_config
from pretrain.config.schema import (
    DataConfig,
    EvalSourceConfig,
    OptimConfig,
    RunConfig,
    SlotsConfig,
    SourceConfig,
    SyntheticConfig,
    TrainConfig,
)
from pretrain.config.validation import validate
from pretrain.model.config import ConfigError

__all__ = [
    "DATASET_KEYS",
    "MODEL_RUNTIME_KEYS",
    "ConfigError",
    "DataConfig",
    "EvalSourceConfig",
    "OptimConfig",
    "RunConfig",
    "SlotsConfig",
    "SourceConfig",
    "SyntheticConfig",
    "TrainConfig",
    "absolute_paths",
    "check_datasets",
    "check_runtime",
    "check_world",
    "config_differences",
    "config_to_dict",
    "config_yaml",
    "expand_home",
    "follow_dataset",
    "load_config",
    "model_differences",
    "override_value",
    "save_config",
    "validate",
]
