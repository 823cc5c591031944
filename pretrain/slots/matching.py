"""Whether a slot-frequency table belongs to the exported model it is used with: the same memory
shape, model config and tokenizer (their hashes) and the same training run (its id); and loading
an export together with its table, so checked, for TF-IDF ranking (tools/tfidf.py, sparse memory
finetuning).
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.model import ModelConfig
from pretrain.model.names import slot_stream_names
from pretrain.slots.table import TABLE_FILENAME, SlotTable, load_table, model_config_hash, tokenizer_hash


class TableMismatchError(ValueError):
    """A slot table does not belong to the model or tokenizer it is used with."""


def load_model_for_tfidf(export_dir: str | Path):
    """(model on CPU in eval mode, its ModelConfig) from an export directory (pretrain.export.load)."""
    from pretrain.export import load

    model = load(export_dir)
    return model, model.cfg


def check_table_matches(table: SlotTable, model_cfg: ModelConfig, tokenizer_path: str | Path | None) -> None:
    """Refuse a table counted with another model config or tokenizer (TableMismatchError); a
    table of another memory shape (slots, memory layers) is named by that shape."""
    layers = slot_stream_names(model_cfg.memory)
    if (table.num_slots, table.layers) != (model_cfg.memory.num_slots, layers):
        raise TableMismatchError(
            f"slot table {table.path} counts {table.num_slots} slots in {table.layers} but the exported model's "
            f"memory has {model_cfg.memory.num_slots} slots in {layers}: the table belongs to a different model; "
            f"use the {TABLE_FILENAME} exported with this model"
        )
    want = model_config_hash(model_cfg)
    have = table.metadata.get("model_config_hash", "")
    if have != want:
        raise TableMismatchError(
            f"slot table {table.path} was counted with model config hash {have or '<none>'} but the exported "
            f"model's config.json hashes to {want}: the table belongs to a different model; use the "
            f"{TABLE_FILENAME} exported with this model"
        )
    if tokenizer_path is not None:
        want = tokenizer_hash(tokenizer_path)
        have = table.metadata.get("tokenizer_hash", "")
        if have != want:
            raise TableMismatchError(
                f"slot table {table.path} was counted with tokenizer hash {have or '<none>'} but {tokenizer_path} "
                f"hashes to {want}: the table belongs to a different tokenizer; use the matching export"
            )


def load_export_for_tfidf(
    export_dir: str | Path,
    table_path: str | Path | None = None,
    allow_other_run: bool = False,
    other_fix: str = "pass the table of the run it came from (--table)",
):
    """(model, cfg, table, tokenizer path) from an export dir, with the table checked against both
    and, unless `allow_other_run`, against the training run the export came from. `other_fix`: what
    else the caller can do about an export without a table (a tool without --table says its own)."""
    export_dir = Path(export_dir)
    model, cfg = load_model_for_tfidf(export_dir)  # first: a wrong export dir is named as such
    if table_path is None and not (export_dir / TABLE_FILENAME).is_file():
        raise FileNotFoundError(
            f"export {export_dir} holds no {TABLE_FILENAME} (its run counted no slot statistics): export a "
            f"run trained with slots.enabled=true, or {other_fix}"
        )
    table = load_table(table_path or export_dir / TABLE_FILENAME)
    tok = export_dir / "tokenizer.model"
    check_table_matches(table, cfg, tok if tok.is_file() else None)
    if not allow_other_run:
        check_table_run(table, export_dir)
    return model, cfg, table, tok


def check_table_run(table: SlotTable, export_dir: Path) -> None:
    """Refuse a table counted in another training run than the export's (same config, another
    seed or data: its frequencies describe other weights). Both carry the run's id."""
    try:
        export_run = json.loads((export_dir / "config.json").read_text()).get("memlayers", {}).get("run_id", "")
    except (OSError, ValueError):
        export_run = ""
    table_run = table.metadata.get("run_id", "")
    if export_run == table_run:
        return
    if export_run and table_run:
        why = f"was counted in training run {table_run} but {export_dir} was exported from run {export_run}"
    else:
        why = (
            f"carries run id {table_run or '<none>'} and {export_dir}/config.json {export_run or '<none>'}, "
            "so it cannot be told whether they come from the same training run"
        )
    raise TableMismatchError(
        f"slot table {table.path} {why}: use the table exported with this model, or pass "
        "--allow-other-run if you mean to use another run's frequencies"
    )
