"""TF-IDF ranking of memory slots for a batch of text (Lin et al., 2025, sparse memory finetuning).

For slot i and a batch: tf(i) = c(i) / sum_j c(j) (its share of the batch's accesses),
idf(i) = log((|B| + 1) / (df(i) + 1)), with df and |B| (number of background units)
from a slot-frequency table. Also: loading an exported model for ranking, and refusing
a table that was counted with a different model config or tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from pretrain.model import MemoryPlus, ModelConfig, Transformer
from pretrain.model.names import memory_layer_name, slot_stream_names
from pretrain.slots.table import TABLE_FILENAME, SlotTable, load_table, model_config_hash, tokenizer_hash


class TableMismatchError(ValueError):
    """A slot table does not belong to the model or tokenizer it is used with."""


class RankedSlot(NamedTuple):
    slot: int
    score: float
    tokens: list[int]  # token ids at the positions that selected the slot (any head), in order


def tfidf_scores(batch_counts: torch.Tensor, doc_freq: torch.Tensor, num_documents: int) -> torch.Tensor:
    """float64 (N,) scores: c(i)/sum_j c(j) * log((num_documents + 1) / (df(i) + 1))."""
    if batch_counts.shape != doc_freq.shape:
        raise ValueError(f"batch counts {tuple(batch_counts.shape)} and doc_freq {tuple(doc_freq.shape)} differ")
    c = batch_counts.to(torch.float64)
    total = c.sum()
    if total <= 0:
        raise ValueError("the batch has no slot accesses (empty text, or every position is padding)")
    idf = torch.log((num_documents + 1.0) / (doc_freq.to(torch.float64) + 1.0))
    return c / total * idf


def layer_slot_counts(indices: torch.Tensor, keep: torch.Tensor, num_slots: int) -> torch.Tensor:
    """int64 (num_slots,) accesses of one layer: indices (B*S, heads, k) at the positions where keep
    (B*S or (B, S)) is True."""
    flat = indices.reshape(keep.numel(), -1)[keep.reshape(-1).to(indices.device)]
    return torch.bincount(flat.reshape(-1), minlength=num_slots).cpu()


def top_tfidf_slots(counts: torch.Tensor, doc_freq: torch.Tensor, num_documents: int, top: int) -> torch.Tensor:
    """The (at most) `top` slots with the highest TF-IDF, best first (ties: lower slot first), of
    those scoring above 0: a slot the batch does not read, or one read in every background unit
    (df = |B|, idf = log 1 = 0), carries no sign of being specific to the batch, and sparse memory
    finetuning leaves it alone, so fewer than `top` (or none) may come back."""
    scores = tfidf_scores(counts, doc_freq, num_documents)
    signal = scores > 0
    scores = torch.where(signal, scores, torch.full_like(scores, -torch.inf))
    return torch.argsort(scores, descending=True, stable=True)[: min(top, int(signal.sum()))]


def memory_layer_names(model: Transformer) -> list[str]:
    """Canonical layer names for statistics and tables: 'layers.<i>' for each memory block."""
    return [memory_layer_name(i) for i, block in enumerate(model.layers) if block.is_memory]


def resolve_memory_layer(model: torch.nn.Module, layer: str) -> MemoryPlus:
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        module = None
    module = getattr(module, "ffn", module)
    if not isinstance(module, MemoryPlus):
        names = memory_layer_names(model) if isinstance(model, Transformer) else []
        raise ValueError(f"{layer!r} is not a memory layer of this model (memory layers: {names})")
    return module


@torch.no_grad()
def rank_slots(
    model: Transformer,
    token_ids: torch.Tensor,
    table: SlotTable,
    layer: str,
    top: int = 500,
    pad_id: int | None = None,
    keep: torch.Tensor | None = None,
) -> list[RankedSlot]:
    """Run the model on token_ids ((S,) or (B, S)), count `layer`'s accesses at non-padding
    positions (token != pad_id, or where `keep`, of token_ids' shape, is True) and return the
    `top` accessed slots by TF-IDF against `table`, best first."""
    if layer not in table.counts:
        raise ValueError(f"layer {layer!r} is not in the table {table.path} (layers: {table.layers})")
    memory = resolve_memory_layer(model, layer)
    n = memory.n_keys**2
    if n != table.num_slots:
        raise TableMismatchError(f"model layer {layer} has {n} slots but the table {table.path} has {table.num_slots}")
    tokens = token_ids if token_ids.dim() == 2 else token_ids[None]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    model(tokens.to(device))
    model.train(was_training)
    idx = memory.last_indices.reshape(tokens.numel(), -1).cpu()  # (B*S, H*k)
    flat_tokens = tokens.reshape(-1).cpu()
    if keep is not None:
        if keep.shape != token_ids.shape:
            raise ValueError(f"keep {tuple(keep.shape)} must have token_ids' shape {tuple(token_ids.shape)}")
        keep = keep.reshape(-1).cpu().bool()
    else:
        keep = torch.ones_like(flat_tokens, dtype=torch.bool) if pad_id is None else flat_tokens != pad_id
    counts = layer_slot_counts(idx, keep, n)
    scores = tfidf_scores(counts, table.doc_freq[layer], table.num_documents)
    order = top_tfidf_slots(counts, table.doc_freq[layer], table.num_documents, top)
    ranked = []
    for slot in order.tolist():
        positions = ((idx == slot).any(dim=1) & keep).nonzero().flatten()
        ranked.append(RankedSlot(slot, float(scores[slot]), flat_tokens[positions].tolist()))
    return ranked


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


def load_export_for_tfidf(export_dir: str | Path, table_path: str | Path | None = None, allow_other_run: bool = False):
    """(model, cfg, table, tokenizer path) from an export dir, with the table checked against both
    and, unless `allow_other_run`, against the training run the export came from."""
    export_dir = Path(export_dir)
    model, cfg = load_model_for_tfidf(export_dir)  # first: a wrong export dir is named as such
    if table_path is None and not (export_dir / TABLE_FILENAME).is_file():
        raise FileNotFoundError(
            f"export {export_dir} holds no {TABLE_FILENAME} (its run counted no slot statistics): export a "
            "run trained with slots.enabled=true, or pass the table of the run it came from (--table)"
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
