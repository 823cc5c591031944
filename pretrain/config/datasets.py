"""What the config takes from and checks against the prepared datasets it names (data.dir,
data.sources, data.eval_sources): the values a dataset records (vocabulary, seq_len) unless set
explicitly, and that the datasets exist and agree. Reads only their manifests."""

from __future__ import annotations

from pathlib import Path

from pretrain.config.schema import RunConfig
from pretrain.model.config import ConfigError

DATASET_KEYS = ("model.vocab_size", "data.vocab_size", "data.seq_len")  # values a dataset records


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
