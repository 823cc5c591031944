"""Starting a run from an exported model's weights (`train.init_from`): continued pretraining
of a released model on another corpus, or a new schedule from an earlier run.

`check_init_source` runs before the model is built and refuses, naming the fix, an export
whose model settings or tokenizer differ from the run's (a different tokenizer gives the same
ids to other pieces of text). The context settings (`model.max_seq_len`, `model.rope_theta`)
may differ: no weight depends on them, and raising both is how a model is extended to a longer
context (data prepared at the longer `--seq-len`). `load_initial_weights` then fills the freshly built model before
DeepSpeed wraps it: the dense tensors by name and, of each value table, only the columns this
rank holds (read as a slice of the safetensors file; no pickle anywhere).

The rest is new: the optimizer state, step 0, empty slot statistics (they describe this
run's accesses). A run directory that already holds a checkpoint resumes from it and does
not read train.init_from again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from pretrain.config import RunConfig, config_to_dict, model_differences
from pretrain.files import file_sha256
from pretrain.model.config import ConfigError
from pretrain.model.names import value_table_name

WEIGHTS, CONFIG, TOKENIZER = "model.safetensors", "config.json", "tokenizer.model"
CONTEXT_KEYS = ("max_seq_len", "rope_theta")  # no weight depends on them: a context extension


@dataclass
class InitSource:
    dir: Path
    step: str  # the training step the export was written at, as its metadata says ("?" if absent)
    context_changes: dict  # model key -> (export's value, this run's value), of CONTEXT_KEYS

    def describe(self) -> str:
        line = (
            f"initialised from {self.dir} (exported at step {self.step}); optimizer state, step and slot "
            "statistics start afresh"
        )
        if self.context_changes:
            changes = ", ".join(f"model.{k} {a} -> {b}" for k, (a, b) in self.context_changes.items())
            line += f"; context changed: {changes}"
        return line


def check_init_source(cfg: RunConfig, tokenizer_sha256: str | None, data_dir: Path | None) -> InitSource:
    """The export train.init_from names, checked against the run: files present and whole,
    the same model settings (but for how it runs and CONTEXT_KEYS), the same tokenizer as the data's (not
    compared when `tokenizer_sha256` is None: the data is not prepared yet)."""
    from pretrain.export.errors import ExportError
    from pretrain.export.folders import refuse_training_run
    from pretrain.export.loading import model_config_from_json
    from pretrain.export.safetensors_io import read_header

    source = Path(cfg.train.init_from)
    key = f"train.init_from={source}"
    for name in (CONFIG, WEIGHTS, TOKENIZER):
        if not (source / name).is_file():
            try:  # train.init_from=runs/english: the run, not its export
                refuse_training_run(source)
            except ExportError as err:
                raise ConfigError(f"train.init_from={err}") from None
            raise ConfigError(
                f"{key} has no {name}: name a folder written by memlayers-export (config.json, model.safetensors, "
                "tokenizer.model), or leave train.init_from empty to start from random weights"
            )
    try:
        exported = model_config_from_json(source / CONFIG)
        header, _ = read_header(source / WEIGHTS)
    except (ExportError, ConfigError) as err:
        raise ConfigError(f"{key}: {err}") from None
    diffs = model_differences(config_to_dict(exported), config_to_dict(cfg.model))
    context_changes = {k: diffs.pop(k) for k in CONTEXT_KEYS if k in diffs}
    if diffs:
        listed = "; ".join(f"model.{k}: export {a!r} vs config {b!r}" for k, (a, b) in list(diffs.items())[:5])
        raise ConfigError(
            f"{key} holds another model ({listed}): set those keys to the export's values (its config.json), "
            "or leave train.init_from empty"
        )
    if tokenizer_sha256 is not None and file_sha256(source / TOKENIZER) != tokenizer_sha256:
        raise ConfigError(
            f"{key} was trained with another tokenizer than the data in {data_dir} (tokenizer.model differs): the "
            f"same ids would mean other text. Prepare the data with the export's tokenizer: memlayers-prepare-data "
            f"--tokenizer {source / TOKENIZER} --input ... --output ..."
        )
    step = str(header.get("__metadata__", {}).get("step", "?"))
    return InitSource(dir=source, step=step, context_changes=context_changes)


@torch.no_grad()
def load_initial_weights(model: nn.Module, tables: list, source: InitSource) -> None:
    """Copy the export's weights into `model` (materialised, not yet wrapped by DeepSpeed) and
    this rank's columns of each partitioned value table in `tables`."""
    from safetensors import safe_open

    dense = model.state_dict()  # the partitioned value tables are not registered: dense tensors only
    wanted = set(dense) | {f"{value_table_name(i)}.weight" for i in range(len(tables))}
    with safe_open(str(source.dir / WEIGHTS), framework="pt", device="cpu") as weights:
        present = set(weights.keys())
        if present != wanted:
            missing, extra = sorted(wanted - present), sorted(present - wanted)
            raise ConfigError(
                f"train.init_from={source.dir}: {WEIGHTS} does not hold this model's tensors "
                f"(missing {missing[:4]}, unexpected {extra[:4]}): re-export the run with memlayers-export"
            )
        for name, tensor in dense.items():
            stored = weights.get_tensor(name)
            if stored.shape != tensor.shape:
                raise ConfigError(
                    f"train.init_from={source.dir}: {name} is {tuple(stored.shape)} in {WEIGHTS}, "
                    f"{tuple(tensor.shape)} in this model"
                )
            tensor.copy_(stored)
        for i, table in enumerate(tables):
            full = weights.get_slice(f"{value_table_name(i)}.weight")
            if tuple(full.get_shape()) != (table.num_slots, table.v_dim):
                raise ConfigError(
                    f"train.init_from={source.dir}: value table {i} is {tuple(full.get_shape())}, "
                    f"({table.num_slots}, {table.v_dim}) in this model"
                )
            table.shard.copy_(full[:, table.col_start : table.col_end])
