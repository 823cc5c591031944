"""The config's paths (train.run_dir, train.init_from, data.dir, data.cache_dir, each source's dir):
`~` expanded, an unexpanded shell variable refused, a name longer than file systems allow refused,
relative paths made absolute against the directory the run starts in."""

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


NAME_MAX, PATH_MAX = 255, 4096  # bytes: Linux's limits for one name and for a whole path (ext4, xfs, NFS, Lustre)


def check_path_lengths(cfg: RunConfig) -> RunConfig:
    """Refuse, naming the key, a path no file system here can hold: such a train.run_dir, data.cache_dir
    or train.init_from ended the job with an OSError traceback ("File name too long") after torch."""
    for section, name, key in _path_fields(cfg):
        value = getattr(section, name)
        names = [part for part in value.split("/") if len(part.encode()) > NAME_MAX]
        if names or len(value.encode()) >= PATH_MAX:
            shown = value if len(value) <= 80 else f"{value[:40]}...{value[-20:]}"
            what = (
                f"its name {names[0][:20]!r}... has {len(names[0].encode())} bytes, above the {NAME_MAX} a file system "
                f"allows for one name"
                if names
                else f"it has {len(value.encode())} bytes, above the {PATH_MAX - 1} a path may have"
            )
            raise ConfigError(f"{key}={shown!r}: {what}: name a shorter path")
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
