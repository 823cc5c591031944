"""Resuming from a damaged or planted checkpoint: refused before anything is loaded, naming
the file and the newest checkpoint that is complete; no code in a checkpoint ever runs; the
run directory is left as it was."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import CheckpointError, latest_checkpoint
from pretrain.config import ConfigError
from pretrain.train import main, train
from tests.train.helpers import assert_nothing_lost, file_hashes, tiny_config

OPTS = ("train.max_steps=2", "train.checkpoint_every=1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache):
    """A run with two complete checkpoints (steps 1 and 2); tests damage copies of it."""
    run = tmp_path_factory.mktemp("resume-faults") / "run"
    train(tiny_config(run, data_cache, *OPTS))
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def resume(run: Path, data_cache: Path):
    return train(tiny_config(run, data_cache, "train.max_steps=3", "train.checkpoint_every=1"))


class Payload:
    """Unpickling this runs `open(marker, 'w')` under the general unpickler."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_planted_pickle_payload_is_refused_not_executed(run_copy, data_cache, tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = run_copy / "checkpoints" / "step_00000002"
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    states["payload"] = Payload(marker)
    torch.save(states, ckpt / "mp_rank_00_model_states.pt")
    before = file_hashes(run_copy)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt") as err:
        resume(run_copy, data_cache)
    assert not marker.exists()
    assert "step_00000001" in str(err.value)  # the complete checkpoint to fall back to
    assert_nothing_lost(before, run_copy)


def test_planted_payload_in_a_rank_file_is_refused(run_copy, data_cache, tmp_path):
    marker = tmp_path / "payload-ran"
    path = run_copy / "checkpoints" / "step_00000002" / "rank_00000.pt"
    state = torch.load(path, weights_only=True)
    state["data"] = Payload(marker)
    torch.save(state, path)
    before = file_hashes(run_copy)
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt cannot be read as tensors") as err:
        resume(run_copy, data_cache)
    assert not marker.exists() and "step_00000001" in str(err.value)
    assert_nothing_lost(before, run_copy)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory, data_cache):
    """A ZeRO-3 run: DeepSpeed writes per-rank model and optimizer state files."""
    run = tmp_path_factory.mktemp("resume-faults-zero3") / "run"
    train(tiny_config(run, data_cache, "train.max_steps=1", "train.zero_stage=3"))
    return run


def test_planted_payload_in_a_deepspeed_optimizer_file_is_refused_before_building(zero3_run, data_cache, tmp_path):
    """ZeRO's optimizer-state files were only checked for truncation: DeepSpeed's load (forced
    weights-only) then failed with a bare UnpicklingError after the model and engine were built."""
    from pretrain.export.dense import weights_only_loads

    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    marker, path = tmp_path / "payload-ran", run / "checkpoints" / "step_00000001" / name
    with weights_only_loads():
        state = torch.load(path, weights_only=True)
    state["payload"] = Payload(marker)
    torch.save(state, path)
    before = file_hashes(run)
    with pytest.raises(CheckpointError, match=rf"{name} cannot be read as tensors and plain values"):
        train(tiny_config(run, data_cache, "train.max_steps=2", "train.zero_stage=3"))
    assert not marker.exists()
    assert_nothing_lost(before, run)
    assert set(file_hashes(run)) == set(before)  # nothing written either (the run's config, TensorBoard)


def test_the_checkpoint_offered_instead_passes_the_same_checks(run_copy, data_cache, tmp_path):
    """The earlier checkpoint a refusal names was checked without reading its per-rank file, so a
    payload there was offered as 'complete' (and refused again once followed)."""
    root = run_copy / "checkpoints"
    (root / "step_00000002" / "rank_00000.pt").unlink()
    path = root / "step_00000001" / "rank_00000.pt"
    state = torch.load(path, weights_only=True)
    state["data"] = Payload(tmp_path / "payload-ran")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"step_00000002/rank_00000.pt") as err:
        resume(run_copy, data_cache)
    assert "no earlier complete checkpoint exists" in str(err.value) and "'step_00000001'" not in str(err.value)
    assert not (tmp_path / "payload-ran").exists()


@pytest.mark.parametrize("damage", ["remove", "truncate"])
@pytest.mark.parametrize("name", ["rank_00000.pt", "mp_rank_00_model_states.pt", "values.t0.s0-of-1.safetensors"])
def test_damaged_checkpoint_file_is_named(run_copy, data_cache, name, damage):
    path = run_copy / "checkpoints" / "step_00000002" / name
    if damage == "remove":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    before = file_hashes(run_copy)
    with pytest.raises(CheckpointError) as err:
        resume(run_copy, data_cache)
    message = str(err.value)
    assert name in message and "step_00000001" in message and "latest" in message
    assert_nothing_lost(before, run_copy)


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "values.t0.s0-of-1.safetensors", "rank_00000.pt"])
def test_a_flipped_bit_is_refused_naming_the_file(run_copy, data_cache, name):
    """One bit flipped in the middle of a file (tensor data: its structure still parses) resumed
    silently and trained on the damaged weights: torch does not check its zip members' CRCs and
    safetensors has none. The checkpoint's checksums.json now refuses it, naming the file."""
    path = run_copy / "checkpoints" / "step_00000002" / name
    flip_bit(path, path.stat().st_size // 2)
    before = file_hashes(run_copy)
    with pytest.raises(CheckpointError, match=rf"{name} does not match the CRC-32 it was written with") as err:
        resume(run_copy, data_cache)
    assert "write 'step_00000001' into" in str(err.value)  # the previous checkpoint is whole
    assert_nothing_lost(before, run_copy)


def test_a_checkpoint_without_checksums_still_resumes(run_copy, data_cache):
    """Checkpoints written before checksums.json existed are read as before."""
    for folder in (run_copy / "checkpoints").glob("step_*"):
        (folder / "checksums.json").unlink()
    assert resume(run_copy, data_cache).step == 3
    assert (run_copy / "checkpoints" / "step_00000003" / "checksums.json").is_file()


def test_following_the_message_resumes(run_copy, data_cache):
    """The fix the refusal names (move the damaged folder aside, point latest at the previous) works."""
    root = run_copy / "checkpoints"
    (root / "step_00000002" / "rank_00000.pt").unlink()
    shutil.move(root / "step_00000002", run_copy / "damaged")
    (root / "latest").write_text("step_00000001")
    result = resume(run_copy, data_cache)
    assert result.step == 3 and len(result.losses) == 2


def test_an_unfinished_checkpoint_is_ignored_with_a_message(run_copy, data_cache, capsys):
    """What a rank killed mid-write (kill -9, a time limit's SIGKILL) leaves: a `.tmp-` folder
    beside the complete checkpoints, `latest` naming the previous one. The resume took the
    previous one without saying why the newer step was not used; now its log names the folder."""
    unfinished = run_copy / "checkpoints" / ".tmp-step_00000003"
    unfinished.mkdir()
    (unfinished / "mp_rank_00_model_states.pt").write_bytes(b"PK\x03\x04 cut off")
    result = resume(run_copy, data_cache)
    assert result.step == 3 and len(result.losses) == 1  # resumed at step 2
    out = capsys.readouterr().out
    assert (
        f"ignored the unfinished checkpoint {unfinished} (a run stopped while writing it); resuming from step_00000002"
        in out
    )
    assert not unfinished.exists()  # the save at step 3 removed it


def test_a_second_job_on_the_run_directory_is_refused(run_copy, data_cache, monkeypatch, capsys):
    """Two jobs on one run directory (a hand-made sbatch of the rendered script, a resubmission
    while the first runs) both trained it, each overwriting `latest` and pruning the other's
    checkpoints. Now the second is refused, naming the holder, before it reads or writes anything;
    a holder that ends within run_lock.WAIT_S (a requeued job's previous instance) is waited for."""
    import fcntl
    import os
    import threading

    from pretrain import run_lock

    path = run_copy / run_lock.LOCK_FILE
    holder = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(holder, b"host node7 pid 4242 job 99\n")
    before = file_hashes(run_copy)
    monkeypatch.setattr(run_lock, "WAIT_S", 0.0)
    with pytest.raises(run_lock.RunDirBusy, match=rf"another job trains {run_copy} .*host node7 pid 4242 job 99"):
        resume(run_copy, data_cache)
    assert_nothing_lost(before, run_copy)
    assert set(file_hashes(run_copy)) == set(before)  # nothing written either
    monkeypatch.setattr(run_lock, "WAIT_S", 60.0)
    threading.Timer(1.0, os.close, (holder,)).start()  # the holder ends during the wait
    assert resume(run_copy, data_cache).step == 3
    assert "waiting up to 60 s for the job holding" in capsys.readouterr().out
    again = os.open(path, os.O_RDWR)  # released when the run ended
    fcntl.flock(again, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.close(again)


def test_empty_latest_is_named(run_copy, data_cache, capsys):
    (run_copy / "checkpoints" / "latest").write_text("")
    before = file_hashes(run_copy)
    with pytest.raises(CheckpointError, match="latest is empty"):
        latest_checkpoint(run_copy / "checkpoints")
    code = main(["train.max_steps=3", *tiny_args(run_copy, data_cache)])
    assert code == 2 and "latest is empty" in capsys.readouterr().err
    assert_nothing_lost(before, run_copy)


def test_missing_latest_beside_checkpoints_is_refused(run_copy, data_cache):
    """A run directory with complete checkpoints but no `latest` (a run killed between renaming
    its first checkpoint and writing latest, or latest deleted) trained from step 0 and then
    overwrote them; it is refused, naming the newest folder, and the named fix resumes."""
    root = run_copy / "checkpoints"
    (root / "latest").unlink()
    before = file_hashes(run_copy)
    with pytest.raises(CheckpointError, match="no 'latest' file") as err:
        resume(run_copy, data_cache)
    assert "the newest folder here is step_00000002" in str(err.value) and "new train.run_dir" in str(err.value)
    assert_nothing_lost(before, run_copy)
    (root / "latest").write_text("step_00000002")
    result = resume(run_copy, data_cache)
    assert result.step == 3 and len(result.losses) == 1  # one step taken: resumed at step 2


def test_latest_naming_a_missing_folder_names_the_fix(run_copy, data_cache):
    (run_copy / "checkpoints" / "step_00000002").rename(run_copy / "moved")
    before = file_hashes(run_copy)
    with pytest.raises(CheckpointError, match=r"names checkpoint 'step_00000002' but .* is missing") as err:
        resume(run_copy, data_cache)
    assert "the newest folder here is step_00000001" in str(err.value)
    assert_nothing_lost(before, run_copy)


def tiny_args(run: Path, cache: Path) -> list[str]:
    from tests.train.helpers import TINY

    return [*TINY, f"train.run_dir={run}", f"data.cache_dir={cache}"]


def test_keep_zero_checkpoints_is_refused(run_copy, data_cache):
    before = file_hashes(run_copy)
    with pytest.raises(ConfigError, match="keep_checkpoints=0"):
        train(tiny_config(run_copy, data_cache, "train.max_steps=3", "train.keep_checkpoints=0"))
    assert_nothing_lost(before, run_copy)
    assert latest_checkpoint(run_copy / "checkpoints").is_dir()


def test_the_kernel_may_change_on_resume_the_model_may_not(run_copy, data_cache):
    resumed = train(tiny_config(run_copy, data_cache, "train.max_steps=3", "model.memory.kernel=torch"))
    assert resumed.step == 3
    before = file_hashes(run_copy)
    with pytest.raises(ConfigError, match=r"different model config \(model.memory.k: checkpoint 4 vs config 8\)"):
        train(tiny_config(run_copy, data_cache, "train.max_steps=4", "model.memory.k=8"))
    assert_nothing_lost(before, run_copy)


def test_a_zero_stage_deepspeed_cannot_load_is_refused_before_loading(run_copy, data_cache):
    """Saved at ZeRO 0; resuming at 1 failed inside DeepSpeed's load (FileNotFoundError). Now a
    ConfigError names both stages before anything is read; 1 <-> 2 stays allowed (launch.py)."""
    before = file_hashes(run_copy)
    with pytest.raises(ConfigError, match=r"saved at train.zero_stage=0; .*not at 1: set train.zero_stage=0"):
        train(tiny_config(run_copy, data_cache, "train.max_steps=3", "train.zero_stage=1"))
    assert_nothing_lost(before, run_copy)


def test_a_precision_deepspeed_cannot_load_is_refused_before_loading(run_copy, data_cache):
    """Saved in fp32; resuming in bf16 failed inside DeepSpeed's load (KeyError 'dynamic_loss_scale')
    after the model and engine were built. Now a ConfigError names both before anything is read."""
    before = file_hashes(run_copy)
    with pytest.raises(ConfigError, match=r"saved at train.dtype=fp32; .*not at bf16 .*: set train.dtype=fp32"):
        train(tiny_config(run_copy, data_cache, "train.max_steps=3", "train.dtype=bf16"))
    assert_nothing_lost(before, run_copy)


def test_a_value_optimizer_with_the_other_second_moment_is_refused_before_building(run_copy, data_cache):
    """Saved with adamw (element-wise second moment); resuming with sparse_rowwise_adamw failed in the
    value shards' load, after the model was built, with a ShardFileError traceback that named no
    optimizer. Now a ConfigError names both and the ones that load it, before anything is read."""
    before = file_hashes(run_copy)
    with pytest.raises(ConfigError) as err:
        train(tiny_config(run_copy, data_cache, "train.max_steps=3", "optim.value_optimizer=sparse_rowwise_adamw"))
    assert str(err.value) == (
        "step_00000002 was saved with optim.value_optimizer=adamw, whose element-wise second moment "
        "sparse_rowwise_adamw cannot load: set optim.value_optimizer=adamw or sparse_adamw, or start a new run "
        "(train.run_dir, or train.init_from to keep the weights) with the new optimizer"
    )
    assert_nothing_lost(before, run_copy)


def test_a_first_checkpoint_whose_latest_failed_names_the_fix_that_resumes(tmp_path, data_cache, monkeypatch):
    """`latest` written after the first checkpoint's folder was renamed failed (a full disk): the
    message said that nothing else was changed and the run would resume from the start, where a
    resume refuses checkpoint folders without `latest`. It says to write the folder's name into
    latest, and doing that resumes from it."""
    import errno
    import re

    import pretrain.checkpoint.checkpointer as checkpoint_module

    real = checkpoint_module.atomic_write

    def full_disk(path, content, *args, **kwargs):
        if Path(path).name == "latest":
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        return real(path, content, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "atomic_write", full_disk)
    run = tmp_path / "run"
    root = run / "checkpoints"
    with pytest.raises(CheckpointError) as err:
        train(tiny_config(run, data_cache, "train.max_steps=1"))
    assert re.fullmatch(
        rf"rank 0 could not write checkpoint step_00000001 \(its filesystem is full: [\d,.]+ [KM]iB free there\) "
        rf"after its folder was complete: {root / 'step_00000001'} holds the whole checkpoint, but {root / 'latest'} "
        rf"was not written\. Free space there, or give train\.run_dir a filesystem with room, then run again, "
        rf"and write 'step_00000001' into {root / 'latest'}: the run resumes from it \(it refuses to start while "
        rf"{root / 'latest'} is missing\)",
        str(err.value),
    ), str(err.value)
    monkeypatch.setattr(checkpoint_module, "atomic_write", real)
    with pytest.raises(CheckpointError, match="no 'latest' file"):
        resume(run, data_cache)
    (root / "latest").write_text("step_00000001")
    result = resume(run, data_cache)
    assert result.step == 3 and len(result.losses) == 2  # resumed at step 1
