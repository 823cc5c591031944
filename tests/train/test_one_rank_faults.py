"""A fault on one rank only reaches every rank, named, within seconds: a checkpoint or slot-table
write that one rank's filesystem refuses (a full disk, a permission), or an error raised on one
rank in the middle of a save. The other ranks used to wait in their next collective for a rank
that had left, until the hang watchdog fired minutes later; the checkpoint before stays the one
that resumes.

The ranks run as spawned gloo processes that stay in the group after they fail, as a failed rank
does under NCCL until its job step ends (a gloo rank that exits breaks its peers' collectives at
once, which would hide the wait)."""

from __future__ import annotations

import errno
import re
import time
from pathlib import Path

import pytest

from tests.train.helpers import rank_results, tiny_config

STEPS = ("train.max_steps=4", "train.checkpoint_every=2", "train.zero_stage=1")  # ZeRO 1: a file per rank
FAILING_SAVE = "step_00000004"

# fault -> (the rank it strikes, what it raises): each strikes once, at the step-4 save
FAULTS = {
    "deepspeed file": (1, PermissionError(errno.EACCES, "Permission denied (injected)")),
    "value shard": (1, OSError(errno.ENOSPC, "No space left on device (injected)")),
    "slot table": (0, OSError(errno.EDQUOT, "Disk quota exceeded (injected)")),
    "error in a writer": (1, ValueError("a fault of the code (injected)")),
    "latest": (0, OSError(errno.ENOSPC, "No space left on device (injected)")),  # after the folder's rename
}
# how each refused write reads (pretrain.refused_writes), and the fix it leads to
SAID = {
    "deepspeed file": ("permission denied", "Make {root} writable for the user this job runs as"),
    "value shard": ("its filesystem is full: ", "Free space there (it needs about "),
    "slot table": ("your disk quota there is used up (", "Free space within your quota (or raise it) (it needs about "),
}
WRITES = ("deepspeed file", "value shard", "slot table")  # of the unfinished folder


def _inject(fault: str, rank: int, injected: dict) -> None:
    """Make `fault` strike this rank at the step-4 save (if it is the fault's rank)."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    import pretrain.checkpoint.checkpointer as checkpoint_module
    from pretrain.parallel.memory_parallel import MemoryParallel
    from pretrain.slots import checkpoint_item

    target_rank, error = FAULTS[fault]
    target, name, path_arg = {
        "deepspeed file": (TorchCheckpointEngine, "save", 2),
        "value shard": (MemoryParallel, "save", 1),
        "slot table": (checkpoint_item, "save_table", 0),
        "error in a writer": (checkpoint_module, "_atomic_torch_save", 1),
        "latest": (checkpoint_module, "atomic_write", 1),  # atomic_write(root / "latest", tag)
    }[fault]
    real = getattr(target, name)

    def failing(*args, **kwargs):
        path = str(kwargs.get("path", args[path_arg] if len(args) > path_arg else ""))
        if rank == target_rank and FAILING_SAVE in path and not injected:
            injected["at"] = time.time()
            raise error
        return real(*args, **kwargs)

    setattr(target, name, failing)


def _faults_on_one_rank(rank: int, run: str, cache: str) -> dict:
    """On every rank: train to step 2, then resume five times into a step-4 save that one fault
    breaks, then once with no fault. Each run's error (or step), when it raised, when injected."""
    from pretrain.train import train

    out = {}
    cfg = lambda: tiny_config(Path(run), Path(cache), *STEPS)  # noqa: E731
    train(tiny_config(Path(run), Path(cache), *STEPS, "train.stop_after=2"))
    for fault in FAULTS:
        injected: dict = {}
        _inject(fault, rank, injected)
        try:
            train(cfg())
            out[fault] = {"error": None}
        except Exception as err:
            out[fault] = {"error": type(err).__name__, "message": str(err), "raised_at": time.time(), **injected}
    result = train(cfg())
    out["resumed"] = {"step": result.step, "steps_trained": len(result.losses)}
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("one-rank-faults")
    ranks = rank_results(2, _faults_on_one_rank, (str(root / "run"), str(data_cache)), root / "out", timeout=300)
    return root / "run", ranks


@pytest.mark.parametrize("fault", WRITES)
def test_a_write_refused_on_one_rank_stops_every_rank_naming_it(outcomes, fault):
    run, ranks = outcomes
    failing_rank, error = FAULTS[fault]
    injected_at = ranks[failing_rank][fault]["at"]
    for rank in ranks:
        got = rank[fault]
        assert got["error"] == "CheckpointError"
        reason, fix = SAID[fault]
        root = run / "checkpoints"
        assert got["message"].startswith(
            f"rank {failing_rank} could not write checkpoint {FAILING_SAVE} in {root} ({reason}"
        )
        assert f".tmp-{FAILING_SAVE} is deleted. {fix.format(root=root)}" in got["message"]
        assert f"{run / 'checkpoints' / 'latest'} still names step_00000002, which is complete" in got["message"]
        assert got["raised_at"] - injected_at < 20  # a wait in a collective lasted until the watchdog: minutes


def test_an_error_on_one_rank_during_a_save_reaches_the_others(outcomes):
    """The failing rank raises its own error (a fault of the code keeps its traceback); the others
    a CheckpointError naming that rank and the error."""
    run, ranks = outcomes
    got = [rank["error in a writer"] for rank in ranks]
    assert got[1]["error"] == "ValueError" and got[1]["message"] == "a fault of the code (injected)"
    assert got[0]["error"] == "CheckpointError"
    assert got[0]["message"].startswith(
        f"rank 1 could not write checkpoint {FAILING_SAVE} in {run / 'checkpoints'} "
        "(ValueError: a fault of the code (injected)); "
    )
    assert "See that rank's traceback" in got[0]["message"]
    assert max(g["raised_at"] for g in got) - ranks[1]["error in a writer"]["at"] < 20


def test_a_failed_latest_write_says_the_folder_is_complete_and_how_to_use_it(outcomes):
    """`latest` is written after the finished folder is renamed: the message said 'nothing else was
    changed ... the unfinished .tmp-step_00000004 is removed at the next save', while step_00000004
    stood there complete (and the .tmp- folder was gone)."""
    run, ranks = outcomes
    root = run / "checkpoints"
    for rank in ranks:
        got = rank["latest"]
        assert got["error"] == "CheckpointError"
        head, _, tail = got["message"].partition(" free there)")
        assert re.fullmatch(
            rf"rank 0 could not write checkpoint {FAILING_SAVE} \(its filesystem is full: [\d,.]+ [KM]iB", head
        )
        assert re.fullmatch(
            re.escape(
                f" after its folder was complete: {root / FAILING_SAVE} holds the whole checkpoint, but {root / 'latest'} "
                "still names step_00000002. Free space there (it needs about "
            )
            + r"[\d.]+ [KM]iB"
            + re.escape(
                "), or give train.run_dir a filesystem with room, then run again: the run resumes from "
                f"step_00000002; to resume from {FAILING_SAVE} instead, write '{FAILING_SAVE}' into {root / 'latest'}"
            ),
            tail,
        ), tail
        assert got["raised_at"] - ranks[0]["latest"]["at"] < 20


def test_the_checkpoint_before_the_failed_saves_resumes(outcomes):
    run, ranks = outcomes
    for rank in ranks:
        assert rank["resumed"] == {"step": 4, "steps_trained": 2}  # from step 2, after five failed saves
    assert (run / "checkpoints" / "latest").read_text() == FAILING_SAVE
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the unfinished one removed by the save


class Payload:
    """Unpickling this runs `open(marker, 'w')` under the general unpickler."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refusals_on_one_rank(rank: int, root: str, cache: str) -> dict:
    """Checks before training that read what one rank alone reads: rank 1's copy of the data lacks
    its tokenizer (a node-local copy cut short), then rank 1's file of a checkpoint holds a payload."""
    import shutil

    import torch
    import torch.distributed as dist

    from pretrain.train import train

    out = {}
    data = Path(root, f"data-rank{rank}")
    shutil.copytree(next(Path(cache).glob("embedded-*")), data)
    if rank == 1:
        (data / "tokenizer.model").unlink()
    run = Path(root, "run")
    try:
        train(tiny_config(run, Path(cache), "train.max_steps=1", f"data.dir={data}"))
        out["tokenizer"] = {"error": None}
    except Exception as err:
        out["tokenizer"] = {"error": type(err).__name__, "message": str(err), "raised_at": time.time()}
    train(tiny_config(run, Path(cache), "train.max_steps=1"))  # both on the embedded data
    if rank == 1:
        path = run / "checkpoints" / "step_00000001" / "rank_00001.pt"
        state = torch.load(path, weights_only=True)
        state["data"] = Payload(str(Path(root, "payload-ran")))
        torch.save(state, path)
    dist.barrier()
    try:
        train(tiny_config(run, Path(cache), "train.max_steps=2"))
        out["rank file"] = {"error": None}
    except Exception as err:
        out["rank file"] = {"error": type(err).__name__, "message": str(err), "raised_at": time.time()}
    from pretrain import trainer as trainer_module
    from pretrain.data.shards import CorruptShardError

    real = trainer_module.Trainer.next_batch

    def corrupt_at_step_2(self, batches):  # what rank 1's loader raises on a block that fails its crc32
        if rank == 1 and self.state.step == 1:
            raise CorruptShardError("shard-000003.tar: block 2 does not match its crc32 (injected)")
        return real(self, batches)

    trainer_module.Trainer.next_batch = corrupt_at_step_2
    try:
        train(tiny_config(Path(root, "run2"), Path(cache), "train.max_steps=3"))
        out["shard read"] = {"error": None}
    except Exception as err:
        out["shard read"] = {"error": type(err).__name__, "message": str(err), "raised_at": time.time()}
    return out


@pytest.fixture(scope="module")
def refusals(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("one-rank-refusals")
    return root, rank_results(2, _refusals_on_one_rank, (str(root), str(data_cache)), root / "out", timeout=240)


@pytest.mark.parametrize(
    "check, errors, refusal",
    [
        ("tokenizer", ("DataError",) * 2, r"tokenizer model \S+/data-rank1/tokenizer.model does not exist"),
        ("rank file", ("CheckpointError",) * 2, r"cannot resume from checkpoint \S+: \S+/rank_00001.pt cannot be read"),
        (
            "shard read",
            ("DataError", "CorruptShardError"),
            r"shard-000003.tar: block 2 does not match its crc32 \(injected\)",
        ),
    ],
)
def test_a_refusal_on_one_rank_reaches_every_rank(refusals, check, errors, refusal):
    """Rank 1 refused; rank 0, whose own files were fine, waited for it in its next collective (the
    shard read: during training, where rank 1's loader met a corrupt block of a shard only it reads)."""
    import re

    root, ranks = refusals
    got = [rank[check] for rank in ranks]
    assert (got[0]["error"], got[1]["error"]) == errors
    assert re.match(refusal, got[1]["message"])
    assert re.match(rf"rank 1 on \S+: {refusal}", got[0]["message"])
    assert abs(got[0]["raised_at"] - got[1]["raised_at"]) < 20
    assert not (root / "payload-ran").exists()
