"""An export that lost or truncated a weight is refused by both loaders (ours and transformers'),
naming the file; an export and its slot table carry the training run's id."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pretrain.export import IncompleteFileError, export_checkpoint, load
from pretrain.slots import load_export_for_tfidf, load_table
from tests.export.export_helpers import run_transformers_offline
from tests.train.helpers import assert_nothing_lost, file_hashes

HF_LOAD = r"""
import sys
for name in ("pretrain", "kernels", "tools"):
    sys.modules[name] = None
import torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.float32)
print("loaded")
"""


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_checkpoint(trained[0], tmp_path_factory.mktemp("faults") / "export", show_progress=False)


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    dst = tmp_path / "export"
    shutil.copytree(exported, dst)
    return dst


def hf_load(export_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    return run_transformers_offline(HF_LOAD, [str(export_dir)], tmp_path)


def test_transformers_refuses_an_export_missing_a_tensor(export_copy, tmp_path):
    weights = export_copy / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(weights))
    dropped = "layers.0.attention.wq.weight" if "layers.0.attention.wq.weight" in state else sorted(state)[0]
    del state[dropped]
    save_file(state, str(weights), metadata=metadata)
    before = file_hashes(export_copy)
    proc = hf_load(export_copy, tmp_path)
    assert proc.returncode != 0 and "loaded" not in proc.stdout
    assert "model.safetensors does not hold the weights of the model" in proc.stderr and dropped in proc.stderr, (
        proc.stderr[-2000:]
    )
    assert_nothing_lost(before, export_copy)
    with pytest.raises(Exception, match=dropped.replace(".", r"\.")):
        load(export_copy)


def test_transformers_loads_a_complete_export(exported, tmp_path):
    proc = hf_load(exported, tmp_path)
    assert proc.returncode == 0 and "loaded" in proc.stdout, proc.stderr[-2000:]


def test_truncated_weights_are_named(export_copy):
    weights = export_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(IncompleteFileError, match=r"model\.safetensors is truncated"):
        load(export_copy)


def test_export_and_table_carry_the_run_id(exported, trained):
    run_id = json.loads((exported / "config.json").read_text())["memlayers"]["run_id"]
    assert len(run_id) == 32
    assert load_table(exported).metadata["run_id"] == run_id
    load_export_for_tfidf(exported)  # its own table is accepted
    other = export_checkpoint(trained[1], exported.parent / "other", show_progress=False)
    other_run = json.loads((other / "config.json").read_text())["memlayers"]["run_id"]
    assert other_run != run_id  # another run of the same config
