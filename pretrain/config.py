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
  and tools/submit call it.
String choices are `Literal` types, checked from the annotation (model/config.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from pretrain.files import atomic_write
from pretrain.model.config import ConfigError, ModelConfig, check_choices, choices_message, literal_fields


@dataclass
class SyntheticConfig:
    """The embedded fact-world corpus (pretrain.data.synthetic)."""

    num_entities: int = 2000
    docs_per_entity: int = 4
    new_fact_fraction: float = 0.1  # entities held out as "new facts" for finetuning studies
    seed: int = 1234
    qa_docs_per_entity: int = 2  # question/answer documents per entity, phrased like the probes


@dataclass
class SourceConfig:
    """One prepared dataset of a weighted mixture (pretrain.data.mixture)."""

    dir: str = ""
    weight: float = 1.0  # sequences are drawn in proportion to the weights
    name: str = ""  # for logs and per-source metrics; "" = the directory's name


@dataclass
class EvalSourceConfig:
    """A prepared dataset evaluated at every evaluation but never trained on (data.eval_sources)."""

    dir: str = ""
    name: str = ""  # heldout_loss/<name>; "" = the directory's name


@dataclass
class DataConfig:
    dir: str = ""  # prepared shards (tools/prepare_data); "" = build the embedded corpus under cache_dir
    sources: list[SourceConfig] = field(default_factory=list)  # a weighted mixture instead of data.dir
    # held-out corpora (same tokenizer and seq_len): heldout_loss/<name> at every evaluation, read
    # from their validation split, or their training split when they have none
    eval_sources: list[EvalSourceConfig] = field(default_factory=list)
    cache_dir: str = ".cache/data"
    seq_len: int = 128  # with data.dir/data.sources: the datasets' seq_len unless set explicitly
    num_workers: int = 0
    shuffle_buffer: int = 0
    on_corrupt: Literal["error", "skip"] = "error"
    # attention stays within each document of a packed sequence (a block-causal mask from the
    # batch's document ids), in training and validation; false: plain causal across documents
    document_masking: bool = False
    vocab_size: int = 512  # tokenizer trained for the embedded corpus
    val_fraction: float = 0.05  # documents of the embedded corpus held out for validation
    min_shards: int = 8  # the embedded corpus has at least this many shards per split
    sequences_per_shard: int = 1024  # upper bound on sequences per shard of the embedded corpus
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-3
    value_lr: float = 1e-3  # the anchor's fixed learning rate for memory values
    # follow: the dense schedule's warm-up and decay | constant: value_lr throughout
    # (cosine: this setting's name for follow before optim.decay_shape existed; still read)
    value_lr_schedule: Literal["follow", "constant", "cosine"] = "follow"
    # adamw: dense value gradients + AdamW over whole shards | sparse_adamw: only the rows read
    # this step (row-sparse gradients, lazy Adam; pretrain/parallel/sparse_adamw.py) |
    # sparse_rowwise_adamw: the same with one second moment per row (optimizer state N d + N)
    value_optimizer: Literal["adamw", "sparse_adamw", "sparse_rowwise_adamw"] = "adamw"
    # storage of the value pool's first moment (sparse optimizers only): bfloat16 halves it;
    # updates are computed in fp32 and rounded to nearest when stored
    value_momentum_dtype: Literal["float32", "bfloat16"] = "float32"
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    z_loss: float = 0.0  # weight of mean log(Z)^2 of the output softmax added to the loss (PaLM: 1e-4)
    # The schedule (pretrain/lr_schedule.py): linear warm-up, a stable phase, a decay to
    # lr * min_lr_ratio over the last decay_fraction of train.max_steps. decay_fraction=1
    # decays from the end of warm-up (classic cosine); < 1 is warmup-stable-decay (WSD),
    # which a resume may extend (a larger train.max_steps) until its decay begins.
    warmup_steps: int = 20
    decay_shape: Literal["cosine", "linear", "sqrt", "none"] = "cosine"  # sqrt: 1 - sqrt(progress); none: constant
    decay_fraction: float = 1.0
    min_lr_ratio: float = 0.1
    # resume even where the new schedule gives steps already taken other learning rates
    # (e.g. a lower lr after a loss spike); without it such a resume is refused
    allow_schedule_change: bool = False


@dataclass
class TrainConfig:
    run_dir: str = "runs/tiny"
    seed: int = 0
    max_steps: int = 300
    global_batch: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch: int = 16  # sequences per rank per forward
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    zero_stage: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    probe_limit: int = 200  # fact probes answered per evaluation
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    nan_policy: Literal["stop", "skip"] = "stop"  # stop (save and exit) | skip (drop the step, count it)
    max_skipped_steps: int = 20
    stop_after: int = 0  # checkpoint and exit after this step (a time slice); 0 = run to max_steps
    # an export folder (memlayers-export) whose weights a new run starts from (pretrain/init_from.py);
    # "" = random initialisation. A run that has a checkpoint resumes from it instead.
    init_from: str = ""
    # none | full | memory | selective (pretrain/parallel/activation_checkpointing.py says what each keeps)
    activation_checkpointing: Literal["none", "full", "memory", "selective"] = "none"
    activation_checkpointing_layers: list[int] = field(default_factory=list)  # selective: these blocks
    compile: bool = False  # torch.compile each block (pretrain/parallel/compile.py)
    # MFU's denominator: a GPU's dense bf16 peak in FLOP/s (e.g. 2.25e15 for a B200). null: from
    # the GPU's name (pretrain/metrics.py PEAK_BF16_FLOPS); a GPU not named there logs MFU n/a
    peak_flops: Optional[float] = None
    # Hang detection (pretrain/watchdog.py): a rank that finishes no step, evaluation or checkpoint
    # for hang_timeout_s (startup_timeout_s until its first step) writes where it is stuck to
    # run_dir/hangs/ and the job ends; rank 0 requeues it once per checkpoint. 0 turns it off.
    hang_timeout_s: float = 600.0
    startup_timeout_s: float = 1800.0  # start-up, resume (a universal conversion), compilation
    # how long the ranks wait for each other at the start (pretrain/distributed.py); above the time
    # a job's nodes take to start, which can be a minute or more apart
    rendezvous_timeout_s: float = 600.0
    requeue_on_hang: bool = True


@dataclass
class SlotsConfig:
    enabled: bool = True
    granularity: str = "document"  # document | sequence | chunk:<n_tokens>
    sample_batches: int = 0  # raw slot indices of this many batches kept (reservoir)
    log_every: int = 50


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    slots: SlotsConfig = field(default_factory=SlotsConfig)


def _nearest_key_message(bad_key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(bad_key, sorted(valid), n=1, cutoff=0.4)
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


def config_differences(a, b, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (a's value, b's value)} for every leaf where two config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for key in sorted(set(a) | set(b)):
            out.update(config_differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: (a, b)} if a != b else {}


MODEL_RUNTIME_KEYS = ("memory.kernel", "memory.parallel_size", "document_attention")  # how it runs, not what it is


def model_differences(a: dict, b: dict) -> dict[str, tuple]:
    """config_differences of two model sections, ignoring MODEL_RUNTIME_KEYS: the keys in which
    two models differ as sets of weights."""
    diffs = config_differences(a, b)
    for key in MODEL_RUNTIME_KEYS:
        diffs.pop(key, None)
    return diffs


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
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # overrides hold no interpolation: one of the file's
        raise ConfigError(
            f"config file {path}: {err.full_key}: {str(err).splitlines()[0]}: an interpolation must name an "
            "existing key (e.g. ${train.seed}); or write the value itself"
        ) from None
    expand_home(cfg)
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
                f"({listed}=[...], see the README) or write it in the YAML file"
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


def _merge(merged: DictConfig, layer: DictConfig, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(merged, layer)
    except (ConfigKeyError, ConfigAttributeError) as err:  # _check_tree names unknown keys first
        raise ConfigError(f"{where}: unknown config key '{getattr(err, 'full_key', None) or err}'") from None
    except ValidationError as err:
        key = err.full_key or "?"
        choices = _literal_choices(str(key))
        if choices is not None:
            raise ConfigError(f"{where}: {choices_message(str(key), err.value, choices)}") from None
        raise ConfigError(f"{where}: invalid value for config key '{key}': {str(err.msg).splitlines()[0]}") from None


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


DATASET_KEYS = ("model.vocab_size", "data.vocab_size", "data.seq_len")  # values a dataset records


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


def follow_dataset(cfg: RunConfig, explicit: set[str]) -> None:
    """Set the values the prepared datasets record, unless the YAML or an override sets them.

    model.vocab_size becomes the tokenizer's size padded up to a multiple of 64; an explicit
    value smaller than the tokenizer is refused, a larger one is kept.
    """
    from pretrain.data.errors import DataError
    from pretrain.data.sources import dataset_values, padded_vocab_size, resolve_sources

    try:
        sources = resolve_sources(cfg.data, cfg.data.seq_len if "data.seq_len" in explicit else None)
    except DataError as err:
        raise ConfigError(str(err)) from None
    if not sources:  # the embedded corpus: its tokenizer is trained with data.vocab_size pieces at most
        if "model.vocab_size" not in explicit:
            cfg.model.vocab_size = padded_vocab_size(cfg.data.vocab_size)
        return
    values = dataset_values(sources)
    tokens = values["data.vocab_size"]
    if "model.vocab_size" in explicit and cfg.model.vocab_size < tokens:
        raise ConfigError(
            f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer of {sources[0].dir} "
            f"({tokens} tokens): drop the setting to follow the dataset (model.vocab_size="
            f"{values['model.vocab_size']}) or set model.vocab_size >= {tokens}"
        )
    for key, value in values.items():
        if key not in explicit or key == "data.vocab_size":  # data.vocab_size only shapes the embedded corpus
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)


def validate(cfg: RunConfig) -> RunConfig:
    """Check values and combinations; raise ConfigError naming the key and the fix.

    A pure function of the config: no environment, no file system (see `check_datasets`
    and `check_runtime` for those).
    """
    cfg.model.validate("model")
    check_choices(cfg)
    _check_precision_and_checkpointing(cfg)
    _check_optimizer(cfg.optim)
    _check_steps_and_batch(cfg.train)
    _check_cadences(cfg)
    _check_timing(cfg.train)
    _check_data(cfg)
    _check_slots(cfg.slots)
    return cfg


def _check_precision_and_checkpointing(cfg: RunConfig) -> None:
    """ZeRO stage, the training dtype with memory layers, and which blocks recompute."""
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage={t.zero_stage} must be 0, 1, 2 or 3")
    if t.dtype == "fp16" and cfg.model.memory.enabled:
        raise ConfigError(
            "train.dtype=fp16 is not supported with memory layers: the value pool is optimised outside "
            "DeepSpeed and would receive loss-scaled gradients; use bf16 (no loss scaling) or fp32"
        )
    if t.activation_checkpointing_layers and t.activation_checkpointing != "selective":
        raise ConfigError(
            "train.activation_checkpointing_layers is only read with "
            "train.activation_checkpointing=selective: set that mode or drop the list"
        )
    bad = [i for i in t.activation_checkpointing_layers if not 0 <= i < cfg.model.n_layers]
    if bad:
        raise ConfigError(
            f"train.activation_checkpointing_layers={list(t.activation_checkpointing_layers)} "
            f"names blocks {bad} outside 0..{cfg.model.n_layers - 1} (model.n_layers)"
        )


def _check_steps_and_batch(t: TrainConfig) -> None:
    """Step counts, the batch sizes and the seed (the world size is checked by `check_runtime`)."""
    if t.max_steps <= 0 or t.micro_batch <= 0 or t.global_batch <= 0:
        raise ConfigError("train.max_steps, train.micro_batch and train.global_batch must be positive")
    if t.global_batch % t.micro_batch:
        nearest = max(t.micro_batch, round(t.global_batch / t.micro_batch) * t.micro_batch)
        raise ConfigError(
            f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch}: "
            f"choose global_batch as a multiple of micro_batch (e.g. train.global_batch={nearest}), or a "
            "micro_batch that divides it"
        )
    if t.stop_after < 0 or t.probe_limit < 0:
        raise ConfigError(
            f"train.stop_after={t.stop_after} (0: run to train.max_steps) and train.probe_limit={t.probe_limit} "
            "(fact probes per evaluation) must be >= 0"
        )
    if t.seed < 0:  # the trainer's numpy seeding refused it with a traceback after the start-up
        raise ConfigError(f"train.seed={t.seed} must be >= 0 (e.g. train.seed={-t.seed})")
    if t.max_skipped_steps < 0:  # -1 stopped at the first skip, which is train.nan_policy=stop
        raise ConfigError(
            f"train.max_skipped_steps={t.max_skipped_steps} must be >= 0 (non-finite steps skipped before the run "
            "stops; to stop at the first one, set train.nan_policy=stop)"
        )


def _check_timing(t: TrainConfig) -> None:
    """The seconds the run waits before it calls a rank hung, and the peak its FLOP/s are measured against."""
    if t.hang_timeout_s < 0 or t.startup_timeout_s <= 0:
        raise ConfigError(
            f"train.hang_timeout_s={t.hang_timeout_s} must be >= 0 (0 turns hang detection off) and "
            f"train.startup_timeout_s={t.startup_timeout_s} > 0 (seconds)"
        )
    if not (math.isfinite(t.rendezvous_timeout_s) and t.rendezvous_timeout_s > 0):
        raise ConfigError(
            f"train.rendezvous_timeout_s={t.rendezvous_timeout_s} must be > 0 (seconds the ranks wait for each "
            "other at the start; default 600)"
        )
    if t.peak_flops is not None and not (math.isfinite(t.peak_flops) and t.peak_flops > 0):
        raise ConfigError(
            f"train.peak_flops={t.peak_flops} must be a GPU's dense bf16 peak in FLOP/s (e.g. 9.89e14 for "
            "an H100 SXM), or null to take it from the GPU's name"
        )


def _check_data(cfg: RunConfig) -> None:
    """The data section's own values; those of the embedded corpus only when it is the one read."""
    d = cfg.data
    if d.seq_len <= 0 or d.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} must be in 1..model.max_seq_len={cfg.model.max_seq_len}"
            + (
                f": set model.max_seq_len={d.seq_len} (data.seq_len follows the prepared dataset)"
                if d.seq_len > cfg.model.max_seq_len and (d.dir or d.sources)
                else ""
            )
        )
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers} must be >= 0")
    if d.shuffle_buffer < 0:
        raise ConfigError(f"data.shuffle_buffer={d.shuffle_buffer} must be >= 0 (sequences; 0: one batch at a time)")
    if not (d.dir or d.sources):
        _check_embedded(d)


def _check_slots(s: SlotsConfig) -> None:
    if s.sample_batches < 0:  # was a ValueError traceback once the model and engine were built
        raise ConfigError(f"slots.sample_batches={s.sample_batches} must be >= 0 (0: no background sample)")
    g = s.granularity  # a pattern, not a fixed set of choices: checked here, parsed by slots/granularity.py
    if not (g in ("document", "sequence") or (g.startswith("chunk:") and g[6:].isdigit() and int(g[6:]) > 0)):
        raise ConfigError(f"slots.granularity={g!r} must be document, sequence or chunk:<n_tokens> (e.g. chunk:64)")


def check_datasets(cfg: RunConfig) -> RunConfig:
    """The prepared datasets the config names (data.dir, data.sources) exist and fit data.seq_len.

    Reads only those folders' manifests; the embedded corpus (no data.dir/sources) needs nothing.
    """
    d = cfg.data
    if d.dir and not (Path(d.dir) / "manifest.json").is_file():
        raise ConfigError(
            f"data.dir={d.dir} holds no manifest.json: prepare it with tools/prepare_data.py, "
            f"or leave data.dir empty to use the embedded corpus"
        )
    if d.dir or d.sources or d.eval_sources:
        from pretrain.data.errors import DataError
        from pretrain.data.sources import resolve_eval_sources, resolve_sources

        try:
            resolve_eval_sources(d, resolve_sources(d, d.seq_len))
        except DataError as err:
            raise ConfigError(str(err)) from None
    return cfg


def check_runtime(cfg: RunConfig, world_size: int | None = None, device_type: str | None = None) -> RunConfig:
    """What depends on where the run starts: the device (fp16 and the Triton kernels on CPU)
    and, when `world_size` is given, the launched world (batch and memory-parallel divisibility).

    `device_type` None: this machine's (cuda if available, else cpu).
    """
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    t = cfg.train
    if t.dtype == "fp16" and device_type == "cpu":
        raise ConfigError("train.dtype=fp16 is not supported on CPU (DeepSpeed refuses it): use bf16 or fp32")
    if cfg.model.memory.enabled and cfg.model.memory.kernel == "triton" and device_type == "cpu":
        from kernels.triton_common import INTERPRETING

        if not INTERPRETING:
            raise ConfigError(
                "model.memory.kernel=triton needs a CUDA device (this run is on CPU): use "
                "model.memory.kernel=auto or torch, or set TRITON_INTERPRET=1 to interpret the kernels (slow)"
            )
    if cfg.data.document_masking and cfg.model.document_attention == "flex" and device_type == "cpu":
        raise ConfigError(
            "model.document_attention=flex trains on CUDA only (torch's FlexAttention has no backward on CPU): "
            "use model.document_attention=sdpa on CPU"
        )
    if world_size is not None:
        per_step = t.micro_batch * world_size
        if t.global_batch % per_step:
            # A smaller micro_batch keeps the run's global batch (more accumulation), where one fits.
            fits = [m for m in range(t.micro_batch - 1, 0, -1) if t.global_batch % (m * world_size) == 0]
            nearest = max(per_step, round(t.global_batch / per_step) * per_step)
            keep = f"set train.micro_batch={fits[0]} (the same global batch), or " if fits else ""
            raise ConfigError(
                f"train.global_batch={t.global_batch} is not divisible by train.micro_batch={t.micro_batch} x "
                f"world size {world_size}: {keep}choose global_batch as a multiple of {per_step} (e.g. "
                f"train.global_batch={nearest})"
            )
        if world_size % cfg.model.memory.parallel_size:
            raise ConfigError(
                f"model.memory.parallel_size={cfg.model.memory.parallel_size} must divide the world size {world_size}"
            )
        if cfg.data.dir or cfg.data.sources:  # the prepared datasets' rows go round ranks x workers
            from pretrain.data.checks import check_readers
            from pretrain.data.errors import DataError
            from pretrain.data.sources import resolve_sources

            try:
                check_readers(resolve_sources(cfg.data), world_size, cfg.data.num_workers)
            except DataError as err:
                raise ConfigError(str(err)) from None
    return cfg


def _check_embedded(d: DataConfig) -> None:
    """The embedded corpus's settings (no data.dir or data.sources), which the job reads only
    when it builds the corpus."""
    if d.val_fraction <= 0 or d.min_shards <= 0:
        raise ConfigError(
            f"data.val_fraction={d.val_fraction} and data.min_shards={d.min_shards} "
            "must be positive for the embedded corpus"
        )
    if d.val_fraction >= 1:
        raise ConfigError(
            f"data.val_fraction={d.val_fraction} must be below 1 for the embedded corpus: it is the share of "
            "documents held out for validation (e.g. 0.05), the rest are trained on"
        )
    if d.sequences_per_shard <= 0:
        raise ConfigError(
            f"data.sequences_per_shard={d.sequences_per_shard} must be positive for the embedded corpus "
            "(at most this many sequences per shard, e.g. 1024)"
        )


def _check_optimizer(o: OptimConfig) -> None:
    """The optimizers' settings and the learning-rate schedule."""
    if o.value_momentum_dtype != "float32" and o.value_optimizer == "adamw":
        raise ConfigError(
            f"optim.value_momentum_dtype={o.value_momentum_dtype} needs a sparse value optimizer: set "
            "optim.value_optimizer=sparse_rowwise_adamw (or sparse_adamw), or value_momentum_dtype=float32"
        )
    if not (math.isfinite(o.lr) and o.lr >= 0 and math.isfinite(o.value_lr) and o.value_lr >= 0):
        raise ConfigError(f"optim.lr={o.lr} and optim.value_lr={o.value_lr} must be >= 0 and finite")
    if not (math.isfinite(o.z_loss) and o.z_loss >= 0):
        raise ConfigError(f"optim.z_loss={o.z_loss} must be >= 0 and finite (0: off; PaLM used 1e-4)")
    for key, beta in (("optim.beta1", o.beta1), ("optim.beta2", o.beta2)):
        if not 0.0 <= beta < 1.0:  # AdamW's own check, which would fail only after the model is built
            raise ConfigError(f"{key}={beta} must be in [0, 1) (AdamW's moment decay; e.g. 0.9 and 0.95)")
    if not (math.isfinite(o.eps) and o.eps >= 0) or not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise ConfigError(
            f"optim.eps={o.eps} and optim.weight_decay={o.weight_decay} must be >= 0 and finite (e.g. 1e-8 and 0.1)"
        )
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0 (0: no warm-up)")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(
            f"optim.decay_fraction={o.decay_fraction} must be in (0, 1]: the share of train.max_steps the "
            "decay takes (1: from the end of warm-up); for no decay set optim.decay_shape=none"
        )
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(
            f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1] (the decay ends at lr * min_lr_ratio)"
        )


def _check_cadences(cfg: RunConfig) -> None:
    """Every "every N steps" setting is used as a modulus and must be positive; keeping no
    checkpoint would delete the one just written."""
    cadences = {
        "train.log_every": cfg.train.log_every,
        "train.eval_every": cfg.train.eval_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "slots.log_every": cfg.slots.log_every,
    }
    for key, value in cadences.items():
        if value <= 0:
            raise ConfigError(
                f"{key}={value} must be >= 1 (a number of steps); to do it rarely, set it above "
                f"train.max_steps={cfg.train.max_steps}"
            )
    if cfg.train.keep_checkpoints < 1:
        raise ConfigError(
            f"train.keep_checkpoints={cfg.train.keep_checkpoints} would delete every checkpoint, "
            "including the one just written: keep at least 1"
        )
    if cfg.train.eval_batches < 1:
        raise ConfigError(f"train.eval_batches={cfg.train.eval_batches} must be >= 1")


def config_yaml(cfg: RunConfig) -> str:
    """The resolved config as the YAML text `save_config` writes."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (temporary name, then rename)."""
    atomic_write(path, config_yaml(cfg))


def config_to_dict(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
