"""Write a finetuned model as a new export folder beside the one it came from.

Everything but the weights is copied from the source export (config, tokenizer, probes,
standalone modeling code and the *pretraining* slot table, which stays the right
background for TF-IDF since the model's shapes do not change); config.json gains a
`memlayers.finetune` record and the model card a "Finetuning" section. Written into a
temporary folder renamed at the end.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pretrain.export.writer import WEIGHTS, check_output_folder
from pretrain.files import atomic_directory


def weights_for_file(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict in `dtype`, with tied tensors stored once per name (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().to("cpu", dtype)
        if tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        out[name] = tensor.contiguous()
    return out


def save_finetuned_export(
    source: str | Path, model: torch.nn.Module, out_dir: str | Path, record: dict, force: bool = False
) -> Path:
    source, out_dir = Path(source), Path(out_dir)
    check_output_folder(out_dir, force, sources=[source])
    dtype = next(model.parameters()).dtype  # pretrain.export.load keeps the source file's dtype
    with atomic_directory(out_dir) as tmp:
        for item in source.iterdir():
            if item.is_file() and item.name != WEIGHTS:
                shutil.copyfile(item, tmp / item.name)
        with safe_open(str(source / WEIGHTS), "pt") as f:  # the step it was exported at, for init_from's log
            metadata = {**(f.metadata() or {}), "format": "pt"}
        save_file(weights_for_file(model, dtype), str(tmp / WEIGHTS), metadata=metadata)
        config = json.loads((tmp / "config.json").read_text())
        config.setdefault("memlayers", {})["finetune"] = record
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        card = tmp / "README.md"
        if card.is_file():
            lines = [f"- {k}: {v}" for k, v in record.items() if not isinstance(v, (list, dict))]
            card.write_text(
                card.read_text()
                + "\n## Finetuning\n\nFinetuned from `"
                + str(source)
                + "`:\n\n"
                + "\n".join(lines)
                + "\n"
            )
    return out_dir
