"""The model: plain nn.Modules and their hyper-parameters.

The names below are imported from their modules on first use, so that reading a config
(`pretrain.model.config`, which `pretrain.config` and memlayers-submit need) does not load torch.
"""

from __future__ import annotations

from pretrain.lazy_names import lazy_names

# name -> the module of this package that defines it
_MODULE_OF = {
    "ConfigError": "config",
    "MemoryConfig": "config",
    "ModelConfig": "config",
    "LayerKind": "accounting",
    "ParameterCount": "accounting",
    "config_parameters": "accounting",
    "count_parameters": "accounting",
    "flops_per_token": "accounting",
    "MemoryEstimate": "memory_budget",
    "estimate_memory": "memory_budget",
    "layer_kinds": "accounting",
    "MemoryPlus": "memory",
    "ValueTable": "memory",
    "Objective": "objective",
    "language_model_loss": "objective",
    "training_objective": "objective",
    "z_loss": "objective",
    "Transformer": "transformer",
}

__all__ = sorted(_MODULE_OF)
__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
