"""`pretrain.export.load` on export folders written here from a random model (no training run):
what config.json may hold and how the loaded model computes."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pretrain.export import load
from pretrain.model import Transformer
from pretrain.model.config import MemoryConfig, ModelConfig


def small_config(kernel: str = "auto") -> ModelConfig:
    memory = MemoryConfig(layers=[1], n_keys=8, heads=2, k=3, k_dim=8, kernel=kernel)
    return ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32, memory=memory)


def write_export(folder: Path, cfg: ModelConfig, model: Transformer) -> Path:
    """config.json + model.safetensors as tools/export.py writes them (the model settings verbatim)."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model": asdict(cfg)}, indent=2))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_export_of_a_triton_run_loads_and_runs_on_cpu(tmp_path):
    # A GPU run trained with model.memory.kernel=triton (the 373m/1.3b benchmark runs) writes that
    # choice into config.json; load(dir, "cpu") must still give a model that runs on the CPU.
    torch.manual_seed(0)
    reference = Transformer(small_config("torch")).eval()
    export = write_export(tmp_path / "export", small_config("triton"), reference)
    model = load(export, device="cpu")
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(tokens), reference(tokens)
    assert torch.equal(got, want)
    assert json.loads((export / "config.json").read_text())["model"]["memory"]["kernel"] == "triton"


@pytest.mark.parametrize(
    "memory, match",
    [
        ({"layers": [1], "new_setting": 1}, r"unknown model\.memory keys \['new_setting'\]"),
        (None, "model.memory"),
        ({"layers": [1], "n_keys": "8"}, "wrong type"),
        ({"layers": [1], "k": -2}, r"model\.memory\.k=-2 must be positive"),  # a ConfigError: memlayers-eval traceback
    ],
)
def test_config_json_with_a_bad_memory_section_is_named(tmp_path, memory, match):
    from pretrain.export import ExportError
    from pretrain.export.loading import model_config_from_json

    raw = asdict(small_config())
    raw["memory"] = memory
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model": raw}))
    with pytest.raises(ExportError, match=match) as err:
        model_config_from_json(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "change, match",
    [
        ("drop", r"missing: layers\.1\.ffn\.keys2"),
        ("extra", r"not in the model: layers\.2\.attention\.wq\.weight"),
        ("shape", r"wrong shape: layers\.0\.ffn\.w1\.weight \(file \(64, 32\), config \(96, 32\)\)"),
        ("int", r"not float: norm\.weight \(I64\)"),
    ],
)
def test_weights_that_do_not_match_config_json_are_named_before_reading(tmp_path, monkeypatch, change, match):
    """load() raised torch's RuntimeError (a traceback out of memlayers-generate and -perplexity,
    naming neither the file nor the fix) after reading every weight; the HF model kept a tensor
    the config has no place for (a layer dropped by an edited config.json) with a warning only."""
    from pretrain.export import ExportError
    from pretrain.hf.modeling_memlayers import MemlayersForCausalLM

    torch.manual_seed(0)
    export = write_export(tmp_path / "export", small_config(), Transformer(small_config()))
    state = {k: v.detach().contiguous() for k, v in Transformer(small_config()).state_dict().items()}
    if change == "drop":
        del state["layers.1.ffn.keys2"]
    elif change == "extra":
        state["layers.2.attention.wq.weight"] = torch.zeros(32, 32)
    elif change == "shape":
        state["layers.0.ffn.w1.weight"] = torch.zeros(64, 32)
    else:
        state["norm.weight"] = torch.ones(32, dtype=torch.int64)
    save_file(state, str(export / "model.safetensors"), metadata={"format": "pt"})
    read = []
    monkeypatch.setattr("pretrain.export.loading.load_file", lambda *a, **k: read.append(a) or {})
    with pytest.raises(ExportError, match=match) as err:
        load(export)
    assert str(export / "model.safetensors") in str(err.value) and "re-export" in str(err.value)
    assert read == []  # refused from the header, before any weight was read
    monkeypatch.undo()
    if change in ("drop", "extra"):  # a wrong shape transformers refuses itself
        with pytest.raises(ValueError, match=match.replace(":", "")):
            MemlayersForCausalLM.from_pretrained(export)
