"""The config's paths (train.run_dir, train.init_from, data.dir, data.cache_dir, each source's dir):
`~` expanded, an unexpanded shell variable refused, relative paths made absolute against the
directory the run starts in."""

from __future__ import annotations

import os
import re
from pathlib import Path

from pretrain.config.schema import RunConfig
from pretrain.model.config import ConfigError

_SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)|\$\{")  # $NAME, ${NAME}, ${...


def _path_fields(cfg):
    """(section, attribute, key) of every path of the config: absolute_paths and expand_home read these."""
    train, data = cfg.train, cfg.data
    for section, name in ((train, "run_dir"), (train, "init_from"), (data, "dir"), (data, "cache_dir")):
        if hasattr(section, name):
            yield section, name, f"{'train' if section is train else 'data'}.{name}"
    for kind in ("sources", "eval_sources"):
        for i, source in enumerate(getattr(data, kind, ())):
            yield source, "dir", f"data.{kind}[{i}].dir"


def expand_home(cfg: RunConfig) -> RunConfig:
    """A path that starts with `~` is under the home directory: `train.run_dir=~/runs/a` reaches us as
    typed (the shell expands `~` after `=` only in variable assignments), and was a folder named `~`
    in the working directory. A `$NAME` or `${NAME}` no shell expanded is refused, naming the key."""
    for section, name, key in _path_fields(cfg):
        value = getattr(section, name)
        if not value:
            continue
        variable = _SHELL_VARIABLE.search(value)
        if variable:
            shown = variable[1] or "NAME"
            raise ConfigError(
                f"{key}={value!r} holds a shell variable that no shell expanded: write the path itself; on the "
                "command line, put the override in double quotes (not single ones); in a config file, write "
                f"${{oc.env:{shown}}} for the environment's ${shown}"
            )
        if value.startswith("~"):
            setattr(section, name, os.path.expanduser(value))
    return cfg


def absolute_paths(cfg, base: Path):
    """Make the config's relative paths absolute against `base`, the directory the run starts in:
    train.run_dir, train.init_from, data.dir, data.cache_dir and each data.sources[] and
    data.eval_sources[] dir ("" stays "": none). `cfg`: a RunConfig, or a saved config as a
    DictConfig (keys it lacks are left alone). Returns `cfg`, changed in place."""

    def absolute(value):
        return value if not value or Path(value).is_absolute() else str(base / value)

    for section, name, _ in _path_fields(cfg):
        setattr(section, name, absolute(getattr(section, name)))
    return cfg
