"""The model: plain nn.Modules and their hyper-parameters."""

from pretrain.model.accounting import LayerKind, ParameterCount, count_parameters, flops_per_token, layer_kinds
from pretrain.model.config import ConfigError, MemoryConfig, ModelConfig
from pretrain.model.memory import MemoryPlus, ValueTable
from pretrain.model.objective import Objective, language_model_loss, training_objective, z_loss
from pretrain.model.transformer import Transformer

__all__ = [
    "ConfigError",
    "MemoryConfig",
    "MemoryPlus",
    "Objective",
    "ModelConfig",
    "ParameterCount",
    "Transformer",
    "ValueTable",
    "count_parameters",
    "flops_per_token",
    "layer_kinds",
    "LayerKind",
    "language_model_loss",
    "training_objective",
    "z_loss",
]
