"""Loading a config: the YAML file and `key.sub=value` overrides as layers merged over the schema's
defaults, each layer's keys checked first (an unknown key names the nearest valid one; a section
given as a value, a list as anything else, a choice outside its Literal are refused naming the key).
No config string is ever evaluated."""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Literal

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pretrain.config.datasets import DATASET_KEYS, check_datasets, follow_dataset
from pretrain.config.paths import absolute_paths, check_path_lengths, expand_home
from pretrain.config.schema import RunConfig
from pretrain.config.validation import validate
from pretrain.model.config import ConfigError, choices_message, default_hint, literal_fields


def _nearest_key_message(bad_key: str, valid: list[str]) -> str:
    """The key meant: one of the same name in another place first (`train.lr` -> optim.lr, where the
    spelling alone suggested the section 'train'; within the same section where there are several),
    else the nearest spelling."""
    name, section = bad_key.rsplit(".", 1)[-1], bad_key.split(".")[0]

    def likeness(key: str) -> tuple:
        return key.split(".")[0] == section, difflib.SequenceMatcher(None, bad_key, key).ratio()

    moved = [k for k in valid if k.rsplit(".", 1)[-1] == name]
    close = [max(moved, key=likeness)] if moved else []
    close = close or difflib.get_close_matches(bad_key, sorted(valid), n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown config key '{bad_key}'{hint}"


def _all_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, dict):
            keys.extend(_all_keys(v, full + "."))
    return keys


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base_dir: str | Path | None = None
) -> RunConfig:
    """Load a YAML config (optional) and `key.sub=value` overrides into a validated RunConfig.

    An override's value is read as YAML (numbers, booleans, [lists], {mappings}), except where
    the key's type is a string (paths, names, choices): there the text after '=' is the value
    as it stands, so `train.run_dir=/tmp/a #b` or `data.dir=0123` name those very paths. An
    OmegaConf interpolation (`${...}`) is refused in an override (a YAML file may use one).
    `base_dir`: the directory the run will start in; the relative paths of `absolute_paths` are
    made absolute against it before the datasets are checked (memlayers-submit's --workdir).
    """
    layers = [] if path is None else [_file_layer(Path(path))]
    layers += [_override_layer(item) for item in overrides or []]
    merged = OmegaConf.structured(RunConfig)
    for where, tree, layer in layers:
        _check_tree(tree, RunConfig, "", where)
        merged = _merge(merged, layer, where)
    if path is not None:
        _check_interpolated_booleans(merged, layers[0][1], layers[0][0])
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # overrides hold no interpolation: one of the file's
        raise ConfigError(
            f"config file {path}: {err.full_key}: {str(err).splitlines()[0]}: an interpolation must name an "
            "existing key (e.g. ${train.seed}); or write the value itself"
        ) from None
    check_path_lengths(expand_home(cfg))
    if base_dir is not None:
        absolute_paths(cfg, Path(base_dir))
    explicit = {k for k in DATASET_KEYS if any(_has_key(tree, k) for _, tree, _ in layers)}
    follow_dataset(cfg, explicit)
    return check_datasets(validate(cfg))


def _file_layer(path: Path) -> tuple[str, dict, DictConfig]:
    """(where, its keys as a plain tree, the layer) of a YAML config file."""
    where = f"config file {path}"
    if not path.is_file():
        raise ConfigError(f"{where} {'is a folder' if path.is_dir() else 'does not exist'}{_config_hint(path)}")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as err:
        raise ConfigError(
            f"{where} is not valid YAML ({_yaml_problem(err, with_line=True)}): fix the syntax there "
            "(close every bracket and quote; configs/tiny.yaml shows the layout)"
        ) from None
    except (OSError, UnicodeDecodeError) as err:  # OmegaConf's error for a YAML scalar is an OSError
        raise ConfigError(
            f"{where} could not be read as a YAML mapping ({err}): write it as `section:` blocks "
            "(model:, data:, train: ...), e.g. configs/tiny.yaml"
        ) from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(
            f"{where} holds a YAML {type(loaded).__name__.removesuffix('Config').lower()}, "
            "not a mapping: write it as `section:` blocks (model:, data:, train: ...), e.g. configs/tiny.yaml"
        )
    return where, OmegaConf.to_container(loaded), loaded


def _config_hint(path: Path) -> str:
    """Where the config a missing `--config` path meant may be: the nearest name among the YAML
    files of its folder (`configs/memory_373.yaml` -> `configs/memory_373m.yaml`), else the folder's
    files; configs/tiny.yaml only when there is no such folder."""
    folder = path if path.is_dir() else path.parent
    names = sorted(p.name for p in folder.glob("*.y*ml") if p.is_file()) if folder.is_dir() else []
    if not names:
        return " (pass --config configs/tiny.yaml, or another YAML file of configs/)"
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6) if not path.is_dir() else []
    if close:
        return f": did you mean --config {folder / close[0]}?"
    return f" (the YAML files in {folder}: {', '.join(names)})"


def override_value(item: str):
    """The value a `key.sub=value` override sets, read as `load_config` reads it ('07' and 7,
    '1e-3' and 0.001 are the same value; a text key keeps what was typed)."""
    _, tree, _ = _override_layer(item)
    for part in item.partition("=")[0].split("."):
        tree = tree[part]
    return tree


def _override_layer(item: str) -> tuple[str, dict, DictConfig]:
    """(where, its keys as a plain tree, the layer) of one `key.sub=value` override."""
    where = f"override {item!r}"
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    if "${" in text or text == "???":
        raise ConfigError(
            f"{where}: OmegaConf would read {text!r} as an interpolation or a missing value, which overrides do "
            "not support: write the value itself (the shell expands $VARIABLES, e.g. train.run_dir=$HOME/runs/a)"
        )
    annotation = _key_annotation(key, where)
    if _is_text(annotation):
        value = text  # as typed: no YAML reading of '#', quotes, 'yes', '0123', ...
    else:
        try:
            value = OmegaConf.to_container(OmegaConf.from_dotlist([f"value={text}"]))["value"]
        except yaml.YAMLError as err:
            if text.endswith((":", ",")):  # `data.sources=[{dir: a}]` unquoted: the shell cut it at a space
                example = "[{dir: data/a}, {dir: data/b}]" if key.endswith("sources") else "[0, 1]"
                raise ConfigError(
                    f"{where}: the value stops at {text[-1]!r}, where the shell split the override at a space: "
                    f'quote the whole override, e.g. "{key}={example}"'
                ) from None
            raise ConfigError(
                f"{where}: the value is not valid YAML ({_yaml_problem(err, with_line=False)}): close every "
                "bracket and quote (a list: [0, 1]; a mapping: {key: value}; quote text holding ' #' or ': ')"
            ) from None
    tree = value
    for part in reversed(key.split(".")):
        tree = {part: tree}
    return where, tree, OmegaConf.create(tree)


def _yaml_problem(err: yaml.YAMLError, with_line: bool) -> str:
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if with_line and mark else problem


def _key_annotation(key: str, where: str):
    """The type of the config key `key` (str for 'train.run_dir', TrainConfig for 'train'); None
    for an unknown key (which _check_tree names). One item of a list cannot be addressed."""
    annotation = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        name = part.split("[")[0]
        if typing.get_origin(annotation) is list or "[" in part:
            listed = ".".join(parts[:i] if "[" not in part else [*parts[:i], name])
            raise ConfigError(
                f"{where}: an override cannot set one item of the list {listed}: set the whole list "
                f"({listed}=[...], as in docs/own-corpus.md) or write it in the YAML file"
            )
        hints = typing.get_type_hints(annotation) if dataclasses.is_dataclass(annotation) else {}
        if part not in hints:
            return None
        annotation = hints[part]
    return annotation


def _is_text(annotation) -> bool:
    """A string-typed key: str, or a Literal of strings."""
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(choice, str) for choice in typing.get_args(annotation))
    return annotation is str


def _check_tree(tree, cls: type, prefix: str, where: str) -> None:
    """Refuse, naming the full key, an unknown key (with the nearest valid one: within a list
    item, among the item's own fields), a section given as a value and a list given as anything
    else (OmegaConf's own errors for these name no key, or are TypeErrors)."""
    if not isinstance(tree, dict):
        example = dataclasses.fields(cls)[0].name
        raise ConfigError(
            f"{where}: {prefix} is a section, not a value ({tree!r}): set its keys, e.g. {prefix}.{example}=... "
            f"as an override, or a `{example}:` line under `{prefix.split('.')[-1].split('[')[0]}:` in YAML"
        )
    hints = typing.get_type_hints(cls)
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            if "[" in prefix:
                valid = [f"{prefix}.{f.name}" for f in dataclasses.fields(cls)]
            else:
                valid = _all_keys(OmegaConf.to_container(OmegaConf.structured(RunConfig)))
            raise ConfigError(f"{where}: {_nearest_key_message(full, valid)}")
        annotation = hints[key]
        if annotation is bool and not isinstance(value, bool) and not _reads_as_bool(value):
            raise ConfigError(f"{where}: {full}={value!r} is not a boolean: write {full}=true or {full}=false")
        if dataclasses.is_dataclass(annotation):
            _check_tree(value, annotation, full, where)
        elif typing.get_origin(annotation) is list:
            if not isinstance(value, list):
                raise ConfigError(
                    f"{where}: {full} is a list, not {value!r}: write it in brackets, e.g. {full}=[...] "
                    "(an empty list: [])"
                )
            item = typing.get_args(annotation)[0]
            if dataclasses.is_dataclass(item):
                for i, entry in enumerate(value):
                    _check_tree(entry, item, f"{full}[{i}]", where)
                    _check_item_values(entry, item, f"{full}[{i}]", where)


def _reads_as_bool(value) -> bool:
    """What OmegaConf reads as a boolean and means as one: 0 and 1, and YAML's words for true and false.
    It reads any other integer (2, -1) and any digit string ('5') as true as well, and those are typos."""
    if isinstance(value, int):
        return value in (0, 1)
    if isinstance(value, str):
        if "${" in value:  # an interpolation (a YAML file's ${oc.env:VAR}, ${train.compile}): read when resolved
            return True
        return value.lower() in ("true", "false", "yes", "no", "on", "off", "y", "n", "1", "0")
    return True  # a list, a mapping, a float, null: OmegaConf refuses it, naming the key


def _check_interpolated_booleans(merged: DictConfig, file_tree: dict, where: str) -> None:
    """The boolean keys the file sets by an interpolation that is still in the merged config, resolved
    and checked as a value typed on the command line is: OmegaConf reads a resolved '2' or '-1' (say
    from ${oc.env:VAR}) as true."""
    keys = _interpolated_bool_keys(file_tree, RunConfig, "")
    if not keys:
        return
    unresolved = OmegaConf.to_container(merged, resolve=False)
    plain = OmegaConf.create(unresolved)  # untyped: an interpolation resolves to its own value, unconverted
    for key in keys:
        text = unresolved
        for part in key.split("."):
            text = text[part]
        if not (isinstance(text, str) and "${" in text):
            continue  # an override replaced it
        try:
            value = OmegaConf.select(plain, key, throw_on_resolution_failure=True)
        except OmegaConfBaseException:
            continue  # OmegaConf.to_object names the failure
        if not _reads_as_bool(value):
            env = re.fullmatch(r"\$\{oc\.env:([^,}]+)(,[^}]*)?\}", text.strip())
            source = f"the environment variable {env.group(1)}" if env else f"the interpolation {text}"
            fix = f"set {env.group(1)} to true or false (or 1, 0)" if env else f"write {key}: true or false"
            raise ConfigError(f"{where}: {key}={text} reads {value!r} from {source}, which is not a boolean: {fix}")


def _interpolated_bool_keys(tree: dict, cls: type, prefix: str) -> list[str]:
    """The dotted boolean keys of `tree` (checked by _check_tree) whose value holds an interpolation;
    sections are searched, lists of sections (which hold no boolean) are not."""
    hints, keys = typing.get_type_hints(cls), []
    for key, value in tree.items():
        full, annotation = f"{prefix}{key}", hints[key]
        if annotation is bool and isinstance(value, str) and "${" in value:
            keys.append(full)
        elif dataclasses.is_dataclass(annotation) and isinstance(value, dict):
            keys += _interpolated_bool_keys(value, annotation, f"{full}.")
    return keys


def _check_item_values(entry: dict, cls: type, key: str, where: str) -> None:
    """A list item's values, merged on their own: merged with the list, OmegaConf names a bad one by its
    field alone ('weight', not data.sources[0].weight)."""
    try:
        OmegaConf.merge(OmegaConf.structured(cls), entry)
    except ValidationError as err:
        raise ConfigError(f"{where}: {_invalid_value_message(f'{key}.{err.full_key}', err)}") from None


def _invalid_value_message(key: str, err: ValidationError) -> str:
    """'invalid value for config key K: <OmegaConf's reason> (the default: K=<the default>)'."""
    section = _section_of(key)
    hint = default_hint(key, section) if section is not None else ""
    return f"invalid value for config key '{key}': {str(err.msg).splitlines()[0]}{hint}"


def _section_of(key: str) -> type | None:
    """The schema's dataclass that holds the scalar key `key` ('data.sources[0].weight' -> SourceConfig);
    None for a key it does not hold."""
    cls = RunConfig
    *sections, _ = key.split(".")
    for part in sections:
        name = part.split("[")[0]
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        if name not in hints:
            return None
        cls = typing.get_args(hints[name])[0] if "[" in part else hints[name]
    return cls if dataclasses.is_dataclass(cls) else None


def _merge(merged: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    """`layer` merged into `merged` in place. `merged` is this load's own (a failed merge discards it)
    and so is `layer`: OmegaConf.merge's deep copy of the growing config for each of a run's 20-30
    overrides was 3/4 of the load's time."""
    try:
        return OmegaConf.unsafe_merge(merged, layer)
    except (ConfigKeyError, ConfigAttributeError) as err:  # _check_tree names unknown keys first
        raise ConfigError(f"{where}: unknown config key '{getattr(err, 'full_key', None) or err}'") from None
    except ValidationError as err:
        key = err.full_key or "?"
        choices = _literal_choices(str(key))
        if choices is not None:
            raise ConfigError(f"{where}: {choices_message(str(key), err.value, choices)}") from None
        raise ConfigError(f"{where}: {_invalid_value_message(str(key), err)}") from None


def _has_key(tree: dict, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _literal_choices(key: str) -> tuple | None:
    """The allowed values of a Literal-typed config key ("train.dtype"), else None."""
    *path, name = key.split(".")
    cls = RunConfig
    for part in path:
        field_type = typing.get_type_hints(cls).get(part)
        if not dataclasses.is_dataclass(field_type):
            return None
        cls = field_type
    return literal_fields(cls).get(name)
