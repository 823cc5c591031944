"""Bad sources, existing outputs and incomplete checkpoints fail before any weight is read,
with messages naming the file or option; nothing is left behind."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pretrain.export import ExportError, IncompleteFileError, export_checkpoint, load


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    """A private copy of a finished ZeRO-1 run, free to damage."""
    dst = tmp_path / "run"
    shutil.copytree(trained[1], dst)
    return dst


def _ckpt(run: Path) -> Path:
    return next((run / "checkpoints").glob("step_*"))


def _export_fails(source, out: Path, match: str, error=ExportError):
    with pytest.raises(error, match=match):
        export_checkpoint(source, out, show_progress=False)
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))


def test_wrong_paths(tmp_path, trained):
    _export_fails(tmp_path / "nope", tmp_path / "out", "no such run directory or checkpoint")
    # a pruned (or never written) step: the checkpoints the folder holds are named (it said only
    # 'no such run directory or checkpoint: runs/demo/checkpoints/step_00000100')
    kept = sorted(p.name for p in (trained[1] / "checkpoints").glob("step_*"))
    _export_fails(
        trained[1] / "checkpoints" / "step_09999999",
        tmp_path / "out",
        rf"no such checkpoint: .*step_09999999; .*checkpoints holds {', '.join(kept)} \(a run keeps its last "
        r"train.keep_checkpoints\): pass one of those",
    )
    (tmp_path / "empty").mkdir()
    _export_fails(tmp_path / "empty", tmp_path / "out", "neither a run directory")
    _export_fails(trained[1] / "config.yaml", tmp_path / "out", "is a file")
    with pytest.raises(ExportError, match="no config.json"):
        load(tmp_path / "empty")
    with pytest.raises(ExportError, match="dtype='fp16'"):
        export_checkpoint(trained[1], tmp_path / "out", dtype="fp16", show_progress=False)


def test_refuses_to_overwrite_without_force(trained, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists.*--force"):
        export_checkpoint(trained[1], out, show_progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    export_checkpoint(trained[1], out, force=True, show_progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_accepts_run_dir_checkpoints_root_and_step_folder(trained, tmp_path):
    a = export_checkpoint(trained[1], tmp_path / "a", show_progress=False)
    b = export_checkpoint(_ckpt(trained[1]), tmp_path / "b", show_progress=False)
    c = export_checkpoint(trained[1] / "checkpoints", tmp_path / "c", show_progress=False)
    weights = [(d / "model.safetensors").read_bytes() for d in (a, b, c)]
    assert weights[0] == weights[1] == weights[2]


def test_missing_value_shard(run_copy, tmp_path):
    shard = _ckpt(run_copy) / "values.t0.s0-of-1.safetensors"
    shard.unlink()
    _export_fails(run_copy, tmp_path / "out", f"missing value-shard file .*{shard.name}", IncompleteFileError)


def test_truncated_value_shard(run_copy, tmp_path):
    shard = _ckpt(run_copy) / "values.t0.s0-of-1.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _export_fails(run_copy, tmp_path / "out", f"{shard.name} is truncated", IncompleteFileError)


def test_a_flipped_bit_in_a_value_shard_is_named(run_copy, tmp_path):
    """A flipped bit in the values' data exported without a word (the file still parses);
    the checkpoint's checksums.json names the file."""
    shard = _ckpt(run_copy) / "values.t0.s0-of-1.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x40
    shard.write_bytes(bytes(data))
    _export_fails(run_copy, tmp_path / "out", f"{shard.name} does not match the CRC-32", IncompleteFileError)


def test_truncated_zero_partition(run_copy, tmp_path):
    optim = _ckpt(run_copy) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    _export_fails(run_copy, tmp_path / "out", f"{optim.name} is truncated", IncompleteFileError)


def test_missing_model_states_config_and_slot_table(run_copy, tmp_path):
    ckpt = _ckpt(run_copy)
    (ckpt / "slot_frequencies.safetensors").unlink()
    _export_fails(run_copy, tmp_path / "out", "missing file .*slot_frequencies.safetensors", IncompleteFileError)
    (ckpt / "mp_rank_00_model_states.pt").unlink()
    _export_fails(run_copy, tmp_path / "out", "missing file .*mp_rank_00_model_states.pt", IncompleteFileError)
    (ckpt / "config.yaml").unlink()
    _export_fails(run_copy, tmp_path / "out", "missing file .*config.yaml", IncompleteFileError)


def test_latest_naming_a_missing_checkpoint(run_copy, tmp_path):
    (run_copy / "checkpoints" / "latest").write_text("step_00000099")
    _export_fails(run_copy, tmp_path / "out", "names checkpoint 'step_00000099'")


def test_export_tool_runs_as_a_script_and_reports_errors(tmp_path):
    """`python tools/export.py` reports a bad source with exit code 2."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, str(repo / "tools" / "export.py"), str(tmp_path / "nope"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no such run directory or checkpoint" in proc.stderr


def test_tools_profile_does_not_shadow_the_stdlib_profile_module():
    """Scripts in tools/ have tools/ first on sys.path; `import profile` (done by cProfile, which
    torch imports) must still give the standard library's module."""
    import subprocess
    import sys

    tools = Path(__file__).resolve().parents[2] / "tools"
    code = "import sys; sys.path.insert(0, sys.argv[1]); import cProfile, profile; assert callable(profile.run)"
    proc = subprocess.run([sys.executable, "-c", code, str(tools)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_file_as_output_is_refused_before_any_input_is_read(tmp_path, monkeypatch):
    # with --force, an out_dir naming a file crashed in the final rename (NotADirectoryError) after
    # the whole export had been written into the temporary folder
    read = []
    monkeypatch.setattr("pretrain.export.writer.inspect", lambda *a, **k: read.append(a) or pytest.fail("read"))
    out = tmp_path / "model.bin"
    out.write_text("mine")
    for force in (False, True):
        with pytest.raises(ExportError, match=r"is a file.*folder"):
            export_checkpoint(tmp_path / "run", out, force=force, show_progress=False)
    assert not read and out.read_text() == "mine"
    assert not list(tmp_path.glob(".model.bin.tmp-*"))


def test_a_training_run_given_as_an_export_is_named_with_the_export_command(tmp_path):
    """memlayers-smf-finetune / memlayers-tfidf (load) and memlayers-average given a run directory
    said 'has no config.json: is it an export directory?'; generate, perplexity and eval already
    named the run and the memlayers-export command that makes an export of it."""
    from pretrain.export.averaging import average_exports

    run = tmp_path / "runs" / "english"
    (run / "checkpoints").mkdir(parents=True)
    step = run / "checkpoints" / "step_00000040"
    step.mkdir()
    (step / "config.yaml").write_text("model: {}\n")
    for folder in (run, step):
        message = (
            f"{folder} is a training run or checkpoint, not an export: export it first, memlayers-export {folder} OUT"
        )
        with pytest.raises(ExportError, match=message):
            load(folder)
        with pytest.raises(ExportError, match=message):
            average_exports([folder, folder], tmp_path / "avg")
    with pytest.raises(ExportError, match="no config.json"):  # any other folder: as before
        load(tmp_path / "runs")


def test_a_full_disk_during_the_export_is_said_with_the_fix(run_copy, tmp_path, monkeypatch, capsys):
    """The export's write meeting a full disk (or quota) ended tools/export.py with a traceback
    (measured onto a full 120 KiB tmpfs: the abort's own close error, exit status 1). It says what
    happened, the space left and the fix, exit status 2, and leaves nothing behind."""
    import errno

    import pretrain.export.safetensors_io as io
    from tools import export as export_tool

    def full_disk(self, tensor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.StreamWriter, "write", full_disk)
    out = tmp_path / "out"
    assert export_tool.main([str(run_copy), str(out)]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after the progress bars
    assert err.startswith(f"error: could not export to {out} (No space left on device; ")
    assert "MiB free there): nothing was left there; free space" in err
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))
