"""The resolved config written out: as YAML text, as a file (temporary name, then rename), and as
a plain dict (saved with checkpoints and exports)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from pretrain.config.schema import RunConfig
from pretrain.files import atomic_write


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config as the YAML text `save_config` writes."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (temporary name, then rename)."""
    atomic_write(path, config_yaml(cfg))


def config_to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
