"""A checkpoint survives a node crash or a power cut at any moment of its save: every file of it
reaches the disk before the rename that commits its folder, the folder holding the new name after
it, and only then is `latest` replaced and the previous checkpoint deleted (keep_checkpoints=1).

A rename alone is not enough (pretrain.files): the filesystem may write it before the data, and the
new `step_*` folder then holds empty files while the old one is already pruned. The order of the
system calls is recorded (tests/syscall_log.py).

Beside the step folders, DeepSpeed copies its recovery scripts (zero_to_fp32.py) into the checkpoints
folder at every ZeRO save; that copy, too, replaces the previous one whole or not at all."""

from __future__ import annotations

import signal
from pathlib import Path

import deepspeed.utils

from pretrain.checkpoint import tag_for
from pretrain.train import train
from tests.crash_launch import start
from tests.syscall_log import SyscallLog
from tests.train.helpers import TINY, tiny_config


def test_a_checkpoint_is_on_disk_before_latest_names_it_and_the_old_one_is_pruned(tmp_path, data_cache, monkeypatch):
    run = tmp_path / "run"
    log = SyscallLog(monkeypatch)
    opts = ("train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=1")
    train(tiny_config(run, data_cache, *opts))
    root = run / "checkpoints"
    final = root / tag_for(2)
    assert not (root / tag_for(1)).exists() and final.is_dir()  # step 1 pruned

    commit = log.rename_onto(final)
    tmp_dir = Path(log.events[commit][1])
    before = log.synced(0, commit)
    files = sorted(p.relative_to(final) for p in final.rglob("*"))
    assert files, "an empty checkpoint"
    unsynced = [str(rel) for rel in files if str(tmp_dir / rel) not in before]
    assert not unsynced, f"renamed into place before reaching the disk: {unsynced}"
    assert str(tmp_dir) in before  # the folder's own entries
    # DeepSpeed's files by the rank that wrote them, before the ranks agree the writing is done (rank 0's
    # flush at the commit cannot reach another node's cache), so before checksums.json is written
    sums = log.rename_onto(tmp_dir / "checksums.json")
    assert str(tmp_dir / "mp_rank_00_model_states.pt") in log.synced(0, sums)

    latest = log.rename_onto(root / "latest")
    assert commit < latest
    assert str(root) in log.synced(commit, latest), "latest replaced before the new folder's name was on disk"
    assert log.events[latest][1] in log.synced(commit, latest), "latest renamed before its text was on disk"

    pruning = [
        i for i, e in enumerate(log.events) if e[0] == "rename" and e[1] == str(root / tag_for(1)) and i > latest
    ]
    assert pruning, "step 1 was not pruned after step 2's commit"
    assert str(root) in log.synced(latest, pruning[0]), "the old checkpoint pruned before latest was on disk"


def test_a_kill_while_deepspeed_copies_its_recovery_script_leaves_the_previous_copy_whole(tmp_path, data_cache):
    run = tmp_path / "run"
    args = [*TINY, f"train.run_dir={run}", f"data.cache_dir={data_cache}", "train.zero_stage=1"]
    args += ["train.max_steps=2", "train.checkpoint_every=1", "train.hang_timeout_s=0"]
    log = tmp_path / "train.log"
    child = start("recovery-script", 2, "train", args, log)
    child.join(300)
    assert child.exitcode == -signal.SIGKILL, log.read_text()[-3000:]
    script = run / "checkpoints" / "zero_to_fp32.py"
    shipped = (Path(deepspeed.utils.__file__).parent / "zero_to_fp32.py").read_bytes()
    assert script.read_bytes() == shipped  # was: its first half, copied over step 1's in place
    assert train(tiny_config(run, data_cache, *args[len(TINY) + 2 :])).step == 2  # resumed from step 1
    assert script.read_bytes() == shipped
    assert not [p.name for p in (run / "checkpoints").iterdir() if ".tmp-" in p.name]  # the kill's leftover removed


def test_the_loss_log_reaches_the_disk_before_the_checkpoint_of_its_step(tmp_path, data_cache, monkeypatch):
    """After a power cut the run resumes from the checkpoint, and TensorBoard hides what was logged
    past it: the events up to it must be on disk too. They were never flushed to disk (the writer's
    flush reaches the page cache), so a crashed node's log could end short of a checkpoint it kept,
    a gap no resume fills."""
    run = tmp_path / "run"
    log = SyscallLog(monkeypatch)
    train(tiny_config(run, data_cache, "train.max_steps=2", "train.checkpoint_every=1", "train.keep_checkpoints=2"))
    (events,) = (run / "tensorboard").glob("events.out.tfevents.*")
    for step in (1, 2):
        commit = log.rename_onto(run / "checkpoints" / tag_for(step))
        assert str(events) in log.synced(0, commit), f"checkpoint {tag_for(step)} committed before the loss log"
