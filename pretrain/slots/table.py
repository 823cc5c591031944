"""The slot-frequency table file (`slot_frequencies.safetensors`): write, read, hashes.

Format (version 1), a safetensors file readable without this codebase:
  tensors
    <layer>.counts             int64 (N,)  top-k hits per slot (tokens x heads x k)
    <layer>.doc_freq           int64 (N,)  units (see `granularity`) that selected the slot
    history.step               int64 (P,)  steps at which coverage was recorded
    history.<layer>.used       int64 (P,)  slots used so far, at each history step
    history.<layer>.interval_used int64 (P,) slots used within the interval ending there
    history.<layer>.interval_top1pct_share, history.<layer>.interval_kl_uniform
                               float64 (P,) the interval's share of accesses of its top 1% of
                               slots, KL(interval || uniform) in nats (optional: older tables
                               lack them; NaN at points before a run recorded them)
    sample.<layer>.indices     int32 (M, B*S, H, k)  background sample (optional)
    sample.doc_ids             int64 (M, B, S)       its doc ids (negative = padding)
    sample.batch_index         int64 (M,)            micro-batch index of each entry
  header metadata (all strings)
    format_version "1", layers (JSON list of layer names), num_slots, num_documents,
    num_tokens (input tokens counted, padding excluded), granularity (document | sequence | chunk:<n>), step, first_step (the counts
    cover steps first_step + 1 .. step; 0 but in a run that resumed with the statistics
    turned on; absent from older tables),
    model_config_hash (see model_config_hash), tokenizer_hash (sha256 of tokenizer.model),
    plus any caller-supplied keys (JSON-encoded unless strings).
Written to a temporary name in the same directory and renamed, so readers never see a
partial file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.files import atomic_write, file_sha256
from pretrain.slots.granularity import parse_granularity
from pretrain.slots.locate import TABLE_FILENAME, find_table
from pretrain.slots.sample import SampleData

FORMAT_VERSION = 1
# Execution choices that do not change the function the model computes.
_HASH_EXCLUDED = {"memory": ("kernel", "parallel_size")}
_RESERVED = ("format_version", "layers", "num_slots", "num_documents", "num_tokens", "granularity", "step")


def model_config_hash(model_cfg) -> str:
    """sha256 of the canonical JSON of a ModelConfig (kernel backend and parallel size left out)."""
    d = dataclasses.asdict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg)
    d = json.loads(json.dumps(d))
    for section, keys in _HASH_EXCLUDED.items():
        for key in keys:
            d.get(section, {}).pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tokenizer_hash(path: str | Path) -> str:
    """sha256 of a tokenizer model file's bytes."""
    return file_sha256(path)


@dataclass
class SlotTable:
    path: Path
    layers: list[str]
    num_slots: int
    counts: dict[str, torch.Tensor]
    doc_freq: dict[str, torch.Tensor]
    num_documents: int
    num_tokens: int
    granularity: str
    step: int
    metadata: dict[str, str]
    history: dict[str, torch.Tensor] = field(default_factory=dict)
    sample: SampleData | None = None


def save_table(path: str | Path, stats_or_state, metadata: dict | None = None) -> Path:
    """Write a table from a SlotStatistics (ideally a reduce() copy) or its state_dict."""
    sd = stats_or_state.state_dict() if hasattr(stats_or_state, "state_dict") else stats_or_state
    meta = sd["meta"]
    layers = meta["layer_names"]
    tensors = {}
    for n in layers:
        tensors[f"{n}.counts"] = sd[f"{n}.counts"].to(torch.int64).contiguous()
        tensors[f"{n}.doc_freq"] = sd[f"{n}.doc_freq"].to(torch.int64).contiguous()
    hist = meta.get("history", {})
    if hist.get("step"):
        tensors["history.step"] = torch.tensor(hist["step"], dtype=torch.int64)
        for n in layers:
            tensors[f"history.{n}.used"] = torch.tensor(hist[f"{n}.used"], dtype=torch.int64)
            tensors[f"history.{n}.interval_used"] = torch.tensor(hist[f"{n}.interval_used"], dtype=torch.int64)
            for key in ("interval_top1pct_share", "interval_kl_uniform"):  # absent from states saved before them
                if f"{n}.{key}" in hist:
                    tensors[f"history.{n}.{key}"] = torch.tensor(hist[f"{n}.{key}"], dtype=torch.float64)
    if "sample.doc_ids" in sd:
        filled = sd["sample.batch_index"] >= 0
        tensors["sample.batch_index"] = sd["sample.batch_index"][filled].to(torch.int64).contiguous()
        tensors["sample.doc_ids"] = sd["sample.doc_ids"][filled].to(torch.int64).contiguous()
        for n in layers:
            tensors[f"sample.{n}.indices"] = sd[f"sample.{n}.indices"][filled].to(torch.int32).contiguous()
    header = {
        "format_version": str(FORMAT_VERSION),
        "layers": json.dumps(layers),
        "num_slots": str(meta["num_slots"]),
        "num_documents": str(int(sd["totals"][0])),
        "num_tokens": str(int(sd["totals"][1])),
        "granularity": meta["granularity"],
        "step": str(meta["step"]),
        "first_step": str(meta.get("first_step", 0)),
        "model_config_hash": "",
        "tokenizer_hash": "",
    }
    for key, value in (metadata or {}).items():
        if key in (*_RESERVED, "first_step"):
            raise ValueError(f"table metadata key {key!r} is reserved (it is computed from the statistics)")
        header[key] = value if isinstance(value, str) else json.dumps(value)
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))


def load_table(path: str | Path) -> SlotTable:
    """Read and validate a table (or the table in a directory); clear errors on bad files."""
    path = find_table(path)
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors slot table: {err}") from None
    with handle as f:
        meta = dict(f.metadata() or {})
        version = meta.get("format_version")
        if version is None and any(name.endswith(".weight") for name in f.keys()):
            raise ValueError(_model_checkpoint_message(path))
        if version != str(FORMAT_VERSION):
            raise ValueError(
                f"{path}: slot table format_version={version!r}, this code reads {FORMAT_VERSION} "
                f"(regenerate the table or use a matching memlayers version)"
            )
        layers, n, totals = _header_fields(path, meta)
        names = set(f.keys())
        counts, doc_freq = {}, {}
        for layer in layers:
            for kind, store in (("counts", counts), ("doc_freq", doc_freq)):
                key = f"{layer}.{kind}"
                if key not in names:
                    raise ValueError(f"{path}: missing tensor {key!r}")
                t = f.get_tensor(key)
                if t.dtype != torch.int64 or t.shape != (n,):
                    raise ValueError(f"{path}: tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected int64 ({n},)")
                _check_range(path, key, t, totals["num_documents"] if kind == "doc_freq" else None)
                store[layer] = t
        history = {k[len("history.") :]: f.get_tensor(k) for k in names if k.startswith("history.")}
        sample = None
        if "sample.doc_ids" in names:
            sample = SampleData(
                {layer: f.get_tensor(f"sample.{layer}.indices") for layer in layers},
                f.get_tensor("sample.doc_ids"),
                f.get_tensor("sample.batch_index"),
            )
    return SlotTable(
        path,
        layers,
        n,
        counts,
        doc_freq,
        totals["num_documents"],
        totals["num_tokens"],
        meta["granularity"],
        totals["step"],
        meta,
        history,
        sample,
    )


def _model_checkpoint_message(path: Path) -> str:
    """What to say when a file of model weights (an export's model.safetensors) is read as a table."""
    beside = path.parent / TABLE_FILENAME
    where = (
        f"its table is {beside}"
        if beside.is_file()
        else f"the table is the {TABLE_FILENAME} of an export (beside its model.safetensors) or of a checkpoint"
    )
    return (
        f"{path} is a model checkpoint (weights, no slot counts), not a slot-frequency table: {where}; "
        "pass that file, or the export or checkpoint directory"
    )


def _header_fields(path: Path, meta: dict[str, str]) -> tuple[list[str], int, dict[str, int]]:
    """(layers, num_slots, {num_documents, num_tokens, step}) of a table's header, each checked."""
    missing = [key for key in _RESERVED if key not in meta]
    if missing:
        raise ValueError(
            f"{path}: the header lacks {missing} (a format-{FORMAT_VERSION} table holds {list(_RESERVED)}): "
            "not a table written by save_table; regenerate it from the run's checkpoint"
        )
    try:
        layers = json.loads(meta["layers"])
    except ValueError:
        layers = None
    if not isinstance(layers, list) or not layers or not all(isinstance(x, str) for x in layers):
        raise ValueError(f"{path}: header 'layers' is {meta['layers']!r}, expected a JSON list of layer names")
    numbers = {}
    for key in ("num_slots", "num_documents", "num_tokens", "step"):
        value = meta[key]
        if not value.isdigit() or (key == "num_slots" and int(value) == 0):
            raise ValueError(f"{path}: header {key!r} is {value!r}, expected an integer >= {int(key == 'num_slots')}")
        numbers[key] = int(value)
    try:
        parse_granularity(meta["granularity"])
    except ValueError as err:
        raise ValueError(f"{path}: header 'granularity': {err}") from None
    return layers, numbers.pop("num_slots"), numbers


def _check_range(path: Path, key: str, t: torch.Tensor, num_documents: int | None) -> None:
    """Counts are >= 0; a document frequency is at most the units counted (num_documents), which
    TF-IDF's idf = log((num_documents + 1) / (df + 1)) relies on (a larger df gives a negative idf)."""
    low, high = (int(t.min()), int(t.max())) if t.numel() else (0, 0)
    if low < 0 or (num_documents is not None and high > num_documents):
        bound = f" and at most num_documents={num_documents}" if num_documents is not None else ""
        raise ValueError(
            f"{path}: tensor {key!r} holds values in [{low}, {high}], expected >= 0{bound}: the table is "
            "damaged or was assembled by hand; regenerate it from the run's checkpoint"
        )
