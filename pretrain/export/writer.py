"""`export_checkpoint`: a training checkpoint -> a self-contained export directory.

Writes, into a temporary folder renamed at the end:
  model.safetensors             every `Transformer.state_dict()` tensor; the value tables
                                assembled from their column shards, row block by row block
  config.json                   {"model": ModelConfig} + the fields transformers reads
  configuration_memlayers.py,   standalone modeling code (pretrain/hf) for
  modeling_memlayers.py,        AutoModelForCausalLM / AutoTokenizer(..., trust_remote_code=True)
  tokenization_memlayers.py,
  tokenizer_config.json
  tokenizer.model, probes.jsonl (when the dataset has probes), slot_frequencies.safetensors
  README.md                     model card: step, tokens, data manifest hash, weight table

Peak host memory: the dense weights (held whole, they are small next to the pool) plus
one row block of one value table; the pool itself is never held whole.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from pretrain.checksums import checksum_problem
from pretrain.export.dense import dense_state_dict
from pretrain.export.errors import ExportError, IncompleteFileError
from pretrain.export.safetensors_io import StreamWriter, read_header, read_rows
from pretrain.export.source import SLOT_TABLE, CheckpointSource, inspect
from pretrain.files import atomic_directory, file_in_the_way, file_sha256
from pretrain.model import Transformer, count_parameters
from pretrain.model.config import ModelConfig
from pretrain.progress_bars import progress_bar

WEIGHTS = "model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROW_BLOCK_BYTES = 64 << 20  # one value-table row block across all shards


def weight_specs(model_cfg: ModelConfig, dtype: torch.dtype) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every state-dict tensor, in order, from a meta-device model."""
    with torch.device("meta"):
        model = Transformer(model_cfg)
    return [(name, tuple(t.shape), dtype) for name, t in model.state_dict().items()]


def hf_config(src: CheckpointSource, dtype_name: str) -> dict:
    from pretrain.data import Tokenizer
    from pretrain.hf import CONFIG_CLASS, MODEL_CLASS, MODEL_TYPE, TOKENIZER_AUTO_MAP

    tok = Tokenizer(src.tokenizer)
    model = asdict(src.cfg.model)
    return {
        "model": model,
        "model_type": MODEL_TYPE,
        "architectures": [MODEL_CLASS],
        "auto_map": {
            "AutoConfig": f"configuration_memlayers.{CONFIG_CLASS}",
            "AutoModelForCausalLM": f"modeling_memlayers.{MODEL_CLASS}",
            **TOKENIZER_AUTO_MAP,
        },
        "vocab_size": model["vocab_size"],
        "hidden_size": model["dim"],
        "num_hidden_layers": model["n_layers"],
        "num_attention_heads": model["n_heads"],
        "max_position_embeddings": model["max_seq_len"],
        "torch_dtype": "float32" if dtype_name == "fp32" else "bfloat16",
        # documents start after the EOS separator (the tokenizer's BOS never occurs in training):
        # generate() with no prompt starts from it, as tools/generate.py does
        "bos_token_id": tok.eos_id,
        "eos_token_id": tok.eos_id,
        # <pad> never occurs in the data (rows are padded with EOS under a loss mask), as the HF
        # tokenizer pads. Not EOS: every prompt starts with it, and generate() given no attention_mask
        # and a stop token other than EOS infers the mask from this id and would hide that separator.
        "pad_token_id": tok.pad_id if tok.pad_id >= 0 else tok.eos_id,
        "use_cache": True,
        "tie_word_embeddings": False,
        "memlayers": {
            "step": src.step,
            "tokens_seen": src.tokens_seen,
            "tokenizer_sha256": tok.sha256,
            "run_id": src.run_id,
            # how the run attended across packed documents: memlayers-perplexity scores as it trained
            "document_masking": src.cfg.data.document_masking,
        },
    }


def hf_tokenizer_config(max_seq_len: int) -> dict:
    """tokenizer_config.json: AutoTokenizer loads tokenizer.model through tokenization_memlayers.py;
    model_max_length is the model's context (truncation=True cuts to it, longer inputs are warned of)."""
    from pretrain.hf import TOKENIZER_AUTO_MAP, TOKENIZER_CLASS

    return {
        "tokenizer_class": TOKENIZER_CLASS,
        "auto_map": TOKENIZER_AUTO_MAP,
        "padding_side": "left",
        "model_max_length": max_seq_len,
    }


def check_output_folder(out_dir: str | Path, force: bool = False, sources=(), what: str = "source export") -> None:
    """Refuse (ExportError) an output folder that cannot take an export: one of the `sources`
    read to make it or a folder holding one (replacing it, --force, would delete the source; `what`
    names them), a file (refused only by the final rename otherwise, after all the work), a path
    through a file, or an existing folder without `force`. Cheap: callers check before reading any input."""
    out_dir = Path(out_dir)
    for source in map(Path, sources):
        if out_dir.resolve() == source.resolve():
            raise ExportError(f"{out_dir} is the {what} {source}: write to a new folder")
        if out_dir.resolve() in source.resolve().parents:
            raise ExportError(
                f"{out_dir} holds the {what} {source}: replacing it would delete the source; write to a new folder"
            )
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file, not an export folder: choose a folder path as the output")
    blocker = file_in_the_way(out_dir)
    if blocker is not None:  # missing parents are made; a file on the way failed the final mkdir
        raise ExportError(
            f"{out_dir}: {blocker} is a file, not a folder, so no export can be written under it; choose a "
            "path under a folder (missing folders are made)"
        )
    if out_dir.exists() and not force:
        raise ExportError(f"{out_dir} already exists: choose another output folder or pass --force to replace it")


def export_checkpoint(
    source: str | Path,
    out_dir: str | Path,
    dtype: str = "fp32",
    force: bool = False,
    show_progress: bool = True,
    dataset_dir: str | Path | None = None,
) -> Path:
    """Export the checkpoint at `source` (run dir, checkpoints/ or a step folder) to `out_dir`; return it."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r} must be one of {sorted(DTYPES)} (--dtype)")
    out_dir = Path(out_dir)
    check_output_folder(out_dir, force, sources=[source], what="source")
    src = inspect(source, dataset_dir)  # every input checked before any weight is read
    # what the source resolved to: a run's checkpoints/ folder holds the checkpoint read, and the
    # dataset folder the tokenizer and probes are copied from (--force would have deleted either)
    check_output_folder(out_dir, force, sources=[src.checkpoint_dir], what="checkpoint")
    check_output_folder(out_dir, force, sources=[src.dataset_dir], what="dataset (tokenizer, probes)")
    problem = checksum_problem(src.checkpoint_dir, collective=False)  # a file changed since it was written
    if problem is not None:
        raise IncompleteFileError(f"cannot export checkpoint {src.checkpoint_dir}: {problem}")
    with atomic_directory(out_dir) as tmp:
        write_weights(src, tmp / WEIGHTS, DTYPES[dtype], show_progress)
        (tmp / "config.json").write_text(json.dumps(hf_config(src, dtype), indent=2) + "\n")
        from pretrain.hf import HF_DIR, SOURCE_FILES

        for name in SOURCE_FILES:
            shutil.copyfile(HF_DIR / name, tmp / name)
        shutil.copyfile(src.tokenizer, tmp / "tokenizer.model")
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(hf_tokenizer_config(src.cfg.model.max_seq_len), indent=2) + "\n"
        )
        if (src.dataset_dir / "probes.jsonl").is_file():
            shutil.copyfile(src.dataset_dir / "probes.jsonl", tmp / "probes.jsonl")
        if src.slot_table is not None:
            shutil.copyfile(src.slot_table, tmp / SLOT_TABLE)
        (tmp / "README.md").write_text(model_card(src, dtype, tmp / WEIGHTS))
    return out_dir


def write_weights(src: CheckpointSource, path: Path, dtype: torch.dtype, show_progress: bool) -> None:
    specs = weight_specs(src.cfg.model, dtype)
    dense = dense_state_dict(src)
    if src.cfg.model.tie_embeddings:
        dense.setdefault("output.weight", dense.get("tok_embeddings.weight"))
    expected_dense = {n for n, _, _ in specs if not n.startswith("values.")}
    missing, extra = expected_dense - set(dense), set(dense) - expected_dense
    if missing or extra:
        raise ExportError(
            f"the checkpoint in {src.checkpoint_dir} does not match its config.yaml's model: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    total = sum(_nbytes(shape, dtype) for _, shape, _ in specs)
    bar = progress_bar(total=total, unit="B", unit_scale=True, desc="export", disable=not show_progress)
    with bar, StreamWriter(path, specs, metadata={"format": "pt", "step": src.step}) as writer:
        for name, shape, _ in specs:
            if name.startswith("values."):
                table = int(name.split(".")[1])
                for block in value_row_blocks(src, table, shape):
                    writer.write(block.to(dtype))
                    bar.update(_nbytes(block.shape, dtype))
                continue
            tensor = dense.pop(name)
            if tuple(tensor.shape) != shape:
                raise ExportError(
                    f"{name} in {src.checkpoint_dir} has shape {tuple(tensor.shape)}, the config's model needs {shape}"
                )
            writer.write(tensor.to(dtype))
            bar.update(_nbytes(shape, dtype))


def value_row_blocks(src: CheckpointSource, table: int, shape: tuple[int, ...]):
    """Row blocks (rows, v_dim) of value table `table`, each assembled from every column shard."""
    num_slots, v_dim = shape
    shards = [f for f in src.value_files if f.name.startswith(f"values.t{table}.")]
    headers = []
    for path in shards:
        header, start = read_header(path)
        meta = header.get("__metadata__", {})
        if int(meta.get("num_slots", -1)) != num_slots or int(meta.get("v_dim", -1)) != v_dim:
            raise ExportError(
                f"{path} holds a {meta.get('num_slots')} x {meta.get('v_dim')} table, the config's "
                f"model needs {num_slots} x {v_dim}"
            )
        headers.append((path, header, start, int(meta["col_start"]), int(meta["col_end"])))
    headers.sort(key=lambda h: h[3])
    if [h[3] for h in headers] + [v_dim] != [0] + [h[4] for h in headers]:
        raise ExportError(f"the value shards of table {table} in {src.checkpoint_dir} do not cover columns 0..{v_dim}")
    rows = max(1, ROW_BLOCK_BYTES // (v_dim * 4))
    for r0 in range(0, num_slots, rows):
        r1 = min(r0 + rows, num_slots)
        yield torch.cat([read_rows(p, h, s, "weight", r0, r1) for p, h, s, _, _ in headers], dim=1)


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dtype).element_size()


def data_manifests(src: CheckpointSource) -> list[tuple[str, float, str]]:
    """(name, weight, sha256 of manifest.json) of each dataset the run trains on: every source of a
    mixture (the card named the first source's alone), else the one folder (data.dir or the embedded corpus)."""
    from pretrain.data.sources import source_specs

    def sha(folder: Path) -> str:
        manifest = folder / "manifest.json"
        return file_sha256(manifest) if manifest.is_file() else "(no manifest.json)"

    specs = source_specs(src.cfg.data) if src.cfg.data.sources else {}
    if not specs:
        return [("", 1.0, sha(src.dataset_dir))]
    return [(name, weight, sha(Path(directory))) for name, (directory, weight) in specs.items()]


def model_card(src: CheckpointSource, dtype: str, weights: Path) -> str:
    from pretrain.export.card import render_card

    with torch.device("meta"):
        params = count_parameters(Transformer(src.cfg.model)).total  # tied embeddings once
    return render_card(
        src.cfg,
        src.step,
        src.tokens_seen,
        data_manifests(src),
        dtype,
        weight_specs(src.cfg.model, DTYPES[dtype]),
        weights.stat().st_size,
        params,
        read_header(src.slot_table)[0].get("__metadata__", {}) if src.slot_table is not None else None,
    )
