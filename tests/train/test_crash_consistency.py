"""Real crashes in the middle of training and of checkpoint writes: the trainer's command line in a
child process ended by SIGKILL (as by the OOM killer, a time limit, a dead node's job step) at named
points of a save (tests/crash_launch.py) and at a random moment, then resumed, again and again, in
one run directory. Every resume must pick a whole checkpoint, and the run must end where an
uninterrupted one ends: the same weights and optimizer state (every tensor of the last checkpoint,
bitwise), the same slot counts and document frequencies, and the same TensorBoard loss log."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.checkpoint import checkpoint_folders, latest_checkpoint
from pretrain.distributed import free_port
from tests.crash_launch import start
from tests.train.helpers import TINY, assert_same_tables

STEPS = 6
RUN = ("train.checkpoint_every=1", "train.keep_checkpoints=1", "train.hang_timeout_s=0", f"train.max_steps={STEPS}")


def run_args(run_dir: Path, cache: Path, *extra: str) -> list[str]:
    return [*TINY, f"train.run_dir={run_dir}", f"data.cache_dir={cache}", *RUN, *extra]


def wait(children, timeout: float = 120) -> list[int]:
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.1, deadline - time.monotonic()))
        assert not child.is_alive(), f"{child.pid} still runs after {timeout} s"
    return [c.exitcode for c in children]


def launch(
    point: str, step: int, run_dir: Path, cache: Path, log: Path, world: int = 1, killed_rank: int = 0, extra=()
):
    """The trainer on `world` ranks; rank `killed_rank` armed to die at `point` of step `step`'s save."""
    port = str(free_port())
    return [
        start(
            point if rank == killed_rank else "none",
            step,
            "train",
            run_args(run_dir, cache, *extra),
            log,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
        )
        for rank in range(world)
    ]


def kill_the_rest(children, dead: int) -> None:
    """What srun's --kill-on-bad-exit or torchrun does once rank `dead` died: SIGKILL for the others."""
    children[dead].join(120)
    assert children[dead].exitcode == -signal.SIGKILL, f"rank {dead} ended with {children[dead].exitcode}"
    for child in children:
        if child.is_alive():
            child.kill()
    wait(children)


def assert_whole_or_none(run_dir: Path) -> None:
    """What a resume would pick is a complete checkpoint: `latest` names a folder whose every
    file matches checksums.json; no other `step_*` folder is half deleted."""
    from pretrain.checksums import checksum_problem

    root = run_dir / "checkpoints"
    picked = latest_checkpoint(root)
    for folder in checkpoint_folders(root):
        assert (folder / "checksums.json").is_file(), (
            f"{folder} is not whole: {sorted(p.name for p in folder.iterdir())}"
        )
        assert checksum_problem(folder, collective=False) is None, folder
    assert picked is None or picked in checkpoint_folders(root)


def tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested structure of dicts, lists and tuples, by its path."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    found = {}
    for key, value in items:
        found.update(tensors(value, f"{prefix}/{key}"))
    return found


def checkpoint_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the latest checkpoint's files (DeepSpeed's model and optimizer states, value
    shards with their optimizer state, per-rank states, slot table), by file and path."""
    from pretrain.export.dense import weights_only_loads

    ckpt = latest_checkpoint(run_dir / "checkpoints")
    found = {}
    for path in sorted(ckpt.iterdir()):
        if path.suffix == ".safetensors":
            found.update({f"{path.name}:{k}": v for k, v in load_file(path).items()})
        elif path.suffix == ".pt":
            with weights_only_loads():
                state = torch.load(path, map_location="cpu", weights_only=True)
            found.update(tensors(state, path.name))
    return found


def loss_log(run_dir: Path) -> dict[int, float]:
    """train/loss by step as TensorBoard reads the run's log (events past a resumed step purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def assert_same_run(run: Path, reference: Path) -> None:
    assert latest_checkpoint(run / "checkpoints").name == latest_checkpoint(reference / "checkpoints").name
    ours, theirs = checkpoint_tensors(run), checkpoint_tensors(reference)
    assert ours.keys() == theirs.keys()
    different = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    assert not different, different
    assert_same_tables(run, reference)
    assert loss_log(run) == loss_log(reference)
    assert sorted(loss_log(run)) == list(range(1, STEPS + 1))


def kill_at_random(run_dir: Path, cache: Path, log: Path, seed: int, world: int = 1, extra=()):
    """SIGKILL for the last rank at a random moment of the first 0.3 s after the run resumed (in a
    step, a checkpoint write or between them; 3 steps and their saves are left), then for the others."""
    before = len(log.read_text())  # what earlier launches wrote there
    children = launch("none", 0, run_dir, cache, log, world, extra=extra)
    deadline = time.monotonic() + 120
    while "resumed from" not in log.read_text()[before:] and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    children[-1].kill()
    kill_the_rest(children, world - 1)


def uninterrupted(run: Path, cache: Path, world: int, extra=()) -> Path:
    log = run.with_suffix(".log")
    assert wait(launch("none", 0, run, cache, log, world, extra=extra)) == [0] * world, log.read_text()[-3000:]
    return run


def test_killed_anywhere_in_a_save_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path, data_cache):
    """One run directory killed five times, each time resumed: at four points of the saves of steps 2
    and 3 (the third leaves step_00000003 renamed but `latest` naming step 2, so the resumed run
    replaces that folder), then at a random moment. keep_checkpoints=1: every save prunes the
    previous checkpoint."""
    reference = uninterrupted(tmp_path / "reference", data_cache, 1)
    run, log = tmp_path / "killed", tmp_path / "killed.log"
    for point, step in [("deepspeed-saved", 2), ("before-checksums", 3), ("renamed", 3), ("pruning", 3)]:
        assert wait(launch(point, step, run, data_cache, log)) == [-signal.SIGKILL], log.read_text()[-3000:]
        assert_whole_or_none(run)
    kill_at_random(run, data_cache, log, seed=5)
    assert_whole_or_none(run)
    assert wait(launch("none", 0, run, data_cache, log)) == [0], log.read_text()[-3000:]
    assert_same_run(run, reference)


def test_one_rank_of_two_killed_in_a_save_the_resumed_run_ends_as_an_uninterrupted_one(tmp_path, data_cache):
    """World 2 (gloo), ZeRO 1 (each rank writes its optimizer shard), the value pool partitioned
    (P = 2): rank 1 dies in the save (DeepSpeed's files written, its own not yet), then at a
    random moment; rank 0 is then killed as a launcher would (srun --kill-on-bad-exit, torchrun)."""
    extra = ("train.zero_stage=1", "model.memory.parallel_size=2")
    reference = uninterrupted(tmp_path / "reference", data_cache, 2, extra)
    run, log = tmp_path / "killed", tmp_path / "killed.log"
    kill_the_rest(launch("deepspeed-saved", 2, run, data_cache, log, 2, killed_rank=1, extra=extra), 1)
    assert_whole_or_none(run)
    kill_at_random(run, data_cache, log, seed=3, world=2, extra=extra)
    assert_whole_or_none(run)
    assert wait(launch("none", 0, run, data_cache, log, 2, extra=extra)) == [0, 0], log.read_text()[-3000:]
    assert_same_run(run, reference)
