"""`load(dir)`: an export directory -> a `Transformer`, with no DeepSpeed or process group;
`export_tokenizer(dir)`: its tokenizer, checked to be there."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.config import config_to_dict
from pretrain.export.errors import ExportError
from pretrain.export.folders import check_export_dir, export_tokenizer_path
from pretrain.export.safetensors_io import read_header
from pretrain.model import Transformer
from pretrain.model.config import ConfigError, MemoryConfig, ModelConfig

FLOAT_CODES = ("F32", "BF16", "F16", "F64")  # safetensors dtypes a model's weights may have


def model_config_from_json(path: Path) -> ModelConfig:
    try:
        raw = json.loads(path.read_text())["model"]
    except (OSError, ValueError, KeyError) as err:
        raise ExportError(f"{path} is not an export config.json with a 'model' section ({err})") from None
    known = set(config_to_dict(ModelConfig()))
    unknown = set(raw) - known
    if unknown:
        raise ExportError(f"{path}: unknown model keys {sorted(unknown)} (written by a newer memlayers?)")
    memory = raw.pop("memory", {})
    if not isinstance(memory, dict):
        raise ExportError(f"{path}: model.memory must be a mapping of memory settings, not {memory!r}")
    unknown = set(memory) - set(config_to_dict(MemoryConfig()))
    if unknown:
        raise ExportError(f"{path}: unknown model.memory keys {sorted(unknown)} (written by a newer memlayers?)")
    try:
        return ModelConfig(**raw, memory=MemoryConfig(**memory)).validate()
    except TypeError as err:  # a value of the wrong type ("8" for 8) fails inside validate's comparisons
        raise ExportError(f"{path}: a model setting has the wrong type ({err}): re-export the checkpoint") from None
    except ConfigError as err:  # e.g. a hand-edited n_heads: -4; a ConfigError alone named no file
        raise ExportError(f"{path}: {err}: correct it there or re-export the checkpoint") from None


def load(export_dir: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The exported model in eval mode on `device`, weights loaded strictly (in the file's dtype)."""
    export_dir = check_export_dir(export_dir)
    cfg = model_config_from_json(export_dir / "config.json")
    if cfg.memory.kernel == "triton" and torch.device(device).type != "cuda":
        # the training run's GPU kernel choice, saved verbatim: off CUDA, "auto" picks the torch ops
        cfg.memory.kernel = "auto"
    with torch.device("meta"):
        model = Transformer(cfg)
    # a truncated file, or one that does not hold the config's tensors, is named before any weight is read
    header, _ = read_header(export_dir / "model.safetensors")
    check_weights_match(export_dir / "model.safetensors", header, model.state_dict())
    state = load_file(str(export_dir / "model.safetensors"), device=str(device))
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def check_weights_match(path: Path, header: dict, expected: dict[str, torch.Tensor]) -> None:
    """Raise (ExportError) when the safetensors `header` of `path` lacks a tensor of `expected`
    (the model config.json describes), holds one it does not, or holds one in another shape or
    a non-float dtype; torch's load_state_dict said so only after reading every weight, in a
    traceback naming neither the file nor the fix."""
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    missing = [n for n in expected if n not in tensors]
    extra = sorted(n for n in tensors if n not in expected)
    shapes = [
        f"{n} (file {tuple(tensors[n]['shape'])}, config {tuple(t.shape)})"
        for n, t in expected.items()
        if n in tensors and tuple(tensors[n]["shape"]) != tuple(t.shape)
    ]
    dtypes = [
        f"{n} ({tensors[n]['dtype']})" for n in expected if n in tensors and tensors[n]["dtype"] not in FLOAT_CODES
    ]
    problems = []
    for label, names in (
        ("missing", missing),
        ("not in the model", extra),
        ("wrong shape", shapes),
        ("not float", dtypes),
    ):
        if names:
            problems.append(f"{label}: {', '.join(names[:4])}{f' and {len(names) - 4} more' if len(names) > 4 else ''}")
    if problems:
        raise ExportError(
            f"{path} does not hold the tensors of the model its config.json describes ({'; '.join(problems)}): "
            "re-export the checkpoint with tools/export.py, or restore the config.json written with it"
        )


def export_probes(export_dir: str | Path, probes_dir: str | Path | None = None, other_fix: str = ""):
    """The fact probes of `probes_dir` (default: the export's probes.jsonl), or an error saying
    why an export may have none and what to pass instead (raised before any model loads)."""
    from pretrain.data import load_probes

    folder = Path(probes_dir or export_dir)
    if probes_dir is not None and folder.is_file():  # read as a folder, it was "<file>/probes.jsonl does not exist"
        fix = (
            f"pass its folder, --probes-dir {folder.parent}"
            if folder.name == "probes.jsonl"
            else ("pass the folder holding a probes.jsonl (the export, or the embedded dataset's folder)")
        )
        raise ExportError(f"--probes-dir {folder} is a file, not a folder: {fix}")
    if probes_dir is None and not (folder / "probes.jsonl").is_file():
        raise ExportError(
            f"{folder} has no probes.jsonl: its run trained on a dataset without fact probes (only the "
            f"embedded fact corpus has them); pass --probes-dir with a folder holding a probes.jsonl{other_fix}"
        )
    if not (folder / "probes.jsonl").is_file():  # load_probes' own hint is the trainer's (data.dir)
        raise ExportError(
            f"{folder / 'probes.jsonl'} does not exist: --probes-dir names a folder holding the fact probes, "
            "an export of a run on the embedded fact corpus or that corpus's dataset folder "
            "(.cache/data/embedded-<hash>, named on the run's first log line)"
        )
    return load_probes(folder)


def export_tokenizer(export_dir: str | Path):
    from pretrain.data import Tokenizer

    return Tokenizer(export_tokenizer_path(export_dir))
