"""Checkpoint averaging (pretrain/export/averaging.py, tools/average_exports.py): the averaged
export's every tensor is the float64 weighted mean of the inputs' (computed here with
safetensors and torch), in any row-block size; everything else comes from the latest input;
exports of another model or tokenizer are refused before anything is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.export import ExportError, averaging, export_checkpoint
from pretrain.export.averaging import average_exports
from pretrain.export.loading import load
from pretrain.train import train
from tests.train.helpers import tiny_config
from tools import average_exports as average_cli


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, data_cache) -> tuple[Path, Path]:
    """Exports of steps 4 and 8 of one tiny run (the weights differ between them)."""
    root = tmp_path_factory.mktemp("averaging")
    run = root / "run"
    train(tiny_config(run, data_cache, "train.max_steps=8", "train.checkpoint_every=4", "optim.lr=1e-2"))
    steps = sorted((run / "checkpoints").glob("step_*"))
    assert [p.name for p in steps] == ["step_00000004", "step_00000008"]
    return tuple(export_checkpoint(p, root / p.name, show_progress=False) for p in steps)


def weighted_mean(dirs, weights) -> dict[str, torch.Tensor]:
    tensors = [load_file(str(d / "model.safetensors")) for d in dirs]
    total = sum(weights)
    out = {}
    for name, first in tensors[0].items():
        acc = tensors[0][name].double() * (weights[0] / total)
        for t, w in zip(tensors[1:], weights[1:]):
            acc = acc + t[name].double() * (w / total)
        out[name] = acc.to(first.dtype)
    return out


@pytest.mark.parametrize("block_bytes", [64 << 20, 1000])
def test_the_average_is_the_float64_weighted_mean(two_steps, tmp_path, monkeypatch, block_bytes):
    monkeypatch.setattr(averaging, "BLOCK_BYTES", block_bytes)  # 1000 B: many blocks per value table
    out = average_exports(list(two_steps), tmp_path / "avg", weights=[1, 3], show_progress=False)
    got, want = load_file(str(out / "model.safetensors")), weighted_mean(two_steps, [1, 3])
    assert got.keys() == want.keys()
    moved = 0
    for name in want:
        assert torch.equal(got[name], want[name]), name
        a, b = (load_file(str(d / "model.safetensors"))[name] for d in two_steps)
        moved += not torch.equal(a, b)
    assert moved > len(want) // 2  # the inputs really differ, so the mean is not one of them
    assert any(n.startswith("values.") for n in want)


def test_averaging_copies_of_one_export_gives_it_back_and_keeps_the_latest_files(two_steps, tmp_path, capsys):
    early, late = two_steps
    copy = tmp_path / "copy"
    shutil.copytree(late, copy)
    assert average_cli.main([str(late), str(copy), "--output", str(tmp_path / "same"), "--no-progress"]) == 0
    assert "averaged 2 exports" in capsys.readouterr().out
    for name, tensor in load_file(str(late / "model.safetensors")).items():
        assert torch.equal(load_file(str(tmp_path / "same" / "model.safetensors"))[name], tensor), name

    out = average_exports([late, early], tmp_path / "avg", show_progress=False)
    for name in ("tokenizer.model", "slot_frequencies.safetensors", "modeling_memlayers.py"):
        assert (out / name).read_bytes() == (late / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert config["memlayers"]["step"] == 8
    assert [(a["step"], a["weight"]) for a in config["memlayers"]["averaged_from"]] == [(8, 0.5), (4, 0.5)]
    assert "## Averaged weights" in (out / "README.md").read_text()
    model = load(out)  # loads strictly and runs
    logits = model(torch.randint(0, model.cfg.vocab_size, (1, 8)))
    assert torch.isfinite(logits).all()


def test_mismatched_inputs_are_refused_before_anything_is_written(two_steps, tmp_path, data_cache):
    early, late = two_steps
    out = tmp_path / "avg"
    with pytest.raises(ExportError, match="at least two exports"):
        average_exports([early], out)
    with pytest.raises(ExportError, match=r"--weights has 3 values for 2 exports"):
        average_exports([early, late], out, weights=[1, 2, 3])
    with pytest.raises(ExportError, match=r"must be non-negative with a positive sum"):
        average_exports([early, late], out, weights=[0, 0])
    # a misspelt input folder (it said 'exports/nope has no config.json', as of a folder that exists)
    with pytest.raises(ExportError, match=rf"no such export directory: {tmp_path / 'nope'} \(memlayers-export"):
        average_exports([early, tmp_path / "nope"], out)
    other_tok = tmp_path / "other_tok"
    shutil.copytree(late, other_tok)
    (other_tok / "tokenizer.model").write_bytes(b"another tokenizer")
    with pytest.raises(ExportError, match=r"has another tokenizer.model than .*average exports of one run"):
        average_exports([early, other_tok], out)
    bigger = tmp_path / "bigger_run"
    train(tiny_config(bigger, data_cache, "train.max_steps=1", "model.memory.n_keys=8"))
    bigger_export = export_checkpoint(bigger, tmp_path / "bigger", show_progress=False)
    with pytest.raises(ExportError, match=r"holds another model .*model.memory.n_keys: 16 vs 8"):
        average_exports([early, bigger_export], out)
    bf16 = export_checkpoint(bigger, tmp_path / "bf16", dtype="bf16", show_progress=False)
    with pytest.raises(ExportError, match=r"different dtypes .*same --dtype"):
        average_exports([bigger_export, bf16], out)
    assert not out.exists()
    (out / "keep.txt").parent.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists: choose another output folder or pass --force"):
        average_exports([early, late], out)
    assert (out / "keep.txt").read_text() == "mine"


def test_a_file_as_output_is_refused_before_any_input_is_read(tmp_path):
    """--force with --output naming a file averaged everything, then crashed in the rename
    (NotADirectoryError) leaving the finished export as a temporary beside it."""
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    with pytest.raises(ExportError, match="is a file, not an export folder"):
        average_exports([tmp_path / "a", tmp_path / "b"], target, force=True)  # inputs not read: they do not exist
    assert target.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def _as_another_run(export: Path, folder: Path, run_id: str) -> Path:
    """A copy of `export` that says it comes from training run `run_id` (config.json, as a run
    of the same config trained apart writes it)."""
    shutil.copytree(export, folder)
    config = json.loads((folder / "config.json").read_text())
    config["memlayers"]["run_id"] = run_id
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_exports_of_different_runs_are_refused_unless_allowed_and_then_the_table_kept_is_named(
    two_steps, tmp_path, capsys
):
    """Exports of two runs of one config were averaged without a word, the slot table and run_id
    taken from the later one. Refused now, naming both runs and --allow-other-runs; with it, a
    warning names both runs and whose table is kept, and config.json lists each input's run."""
    early, late = two_steps
    ours = json.loads((late / "config.json").read_text())["memlayers"]["run_id"]
    assert ours and ours == json.loads((early / "config.json").read_text())["memlayers"]["run_id"]
    other = _as_another_run(early, tmp_path / "other", "0123456789abcdef")
    out = tmp_path / "avg"
    with pytest.raises(ExportError) as refused:
        average_exports([late, other], out, show_progress=False)
    message = str(refused.value)
    assert f"{late} (run {ours}) and {other} (run 0123456789abcdef) come from different training runs" in message
    assert f"the slot table kept ({late}'s)" in message and "--allow-other-runs" in message
    assert not out.exists()
    assert average_cli.main([str(other), str(late), "--output", str(out), "--no-progress"]) == 2
    assert "come from different training runs" in capsys.readouterr().err and not out.exists()
    unknown = _as_another_run(early, tmp_path / "unknown", "")  # exported before run ids: cannot be told
    with pytest.raises(ExportError, match=r"\(run <none: exported before run ids>\) come from different"):
        average_exports([late, unknown], out, show_progress=False)

    argv = [str(other), str(late), "--output", str(out), "--no-progress", "--allow-other-runs"]
    with pytest.warns(UserWarning, match="averaging exports of different training runs") as warned:
        assert average_cli.main(argv) == 0
    text = str(warned[0].message)
    assert f"{other}: run 0123456789abcdef, {late}: run {ours}" in text
    assert f"the slot table and run_id kept are {late}'s (run {ours}, step 8, the latest input)" in text
    config = json.loads((out / "config.json").read_text())["memlayers"]
    assert config["run_id"] == ours
    assert [a["run_id"] for a in config["averaged_from"]] == ["0123456789abcdef", ours]
    assert (out / "slot_frequencies.safetensors").read_bytes() == (late / "slot_frequencies.safetensors").read_bytes()
