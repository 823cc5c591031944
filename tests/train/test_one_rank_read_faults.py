"""A read that fails on one rank alone while a resume checks its checkpoint (a permission, an I/O
error of its node's mount) reaches every rank within seconds, naming the file and the fix.

`verify` turned only unpickling and torch's own errors into a refusal, and the checksum comparison
none: the OSError of a rank's own read left that rank, and the other ranks waited in their next
collective for it until the process group's timeout (measured: rank 0 was still waiting when the
test gave up, 66 s later; the collective timeout is 32 min). Ranks as in test_one_rank_faults.py:
spawned gloo processes that stay in the group after they fail."""

from __future__ import annotations

import errno
import re
import time
from pathlib import Path

import pytest

from tests.train.helpers import rank_results, tiny_config

STEPS = ("train.zero_stage=1",)  # a file per rank, read by its rank alone


def _attempt(run, *overrides) -> dict:
    from pretrain.train import train

    try:
        result = train(tiny_config(*run, *STEPS, *overrides))
        return {"error": None, "step": result.step}
    except Exception as err:
        return {"error": type(err).__name__, "message": str(err), "raised_at": time.time()}


def _read_faults_on_one_rank(rank: int, root: str, cache: str) -> dict:
    """Train to step 1; then resume twice while rank 1 cannot read its own rank file (torch.load:
    an I/O error), then any file of its share of the checksums (a permission); then resume whole."""
    import torch

    import pretrain.checksums as checksums

    run = (Path(root, "run"), Path(cache))
    out = {"first": _attempt(run, "train.max_steps=1")}
    real_load, real_crc = torch.load, checksums.file_crc32

    def failing_load(path, *args, **kwargs):
        if rank == 1 and Path(path).name == "rank_00001.pt":
            raise OSError(errno.EIO, "Input/output error (injected)", str(path))
        return real_load(path, *args, **kwargs)

    def failing_crc(path):
        if rank == 1:
            raise PermissionError(errno.EACCES, "Permission denied (injected)", str(path))
        return real_crc(path)

    torch.load = failing_load
    out["torch.load"] = _attempt(run, "train.max_steps=2")
    torch.load = real_load
    checksums.file_crc32 = failing_crc
    out["checksum"] = _attempt(run, "train.max_steps=2")
    checksums.file_crc32 = real_crc
    out["resumed"] = _attempt(run, "train.max_steps=2")
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("one-rank-read-faults")
    ranks = rank_results(2, _read_faults_on_one_rank, (str(root), str(data_cache)), root / "out", timeout=150)
    return root / "run", ranks


@pytest.mark.parametrize(
    "read, file, reason, fix",
    [
        ("torch.load", "rank_00001.pt", r"Input/output error \(injected\)", "check the disk or mount on this node"),
        ("checksum", r"[^ ]+", r"Permission denied \(injected\)", "make it readable for the user this job runs as"),
    ],
)
def test_a_read_failing_on_one_rank_is_refused_on_every_rank(outcomes, read, file, reason, fix):
    run, ranks = outcomes
    got = [rank[read] for rank in ranks]
    assert got[0]["error"] == got[1]["error"] == "CheckpointError"
    refusal = (
        rf"cannot resume from checkpoint {run / 'checkpoints' / 'step_00000001'}: \S+/{file} cannot be read "
        rf"\({reason}\): .*{fix}.*Nothing was loaded or changed"
    )
    assert re.match(refusal, got[1]["message"]), got[1]["message"]
    assert re.match(rf"rank 1 on \S+: {refusal}", got[0]["message"]) or got[0]["message"] == got[1]["message"]
    assert abs(got[0]["raised_at"] - got[1]["raised_at"]) < 20


def test_the_checkpoint_resumes_once_the_files_read(outcomes):
    _, ranks = outcomes
    for rank in ranks:
        assert rank["first"] == {"error": None, "step": 1}
        assert rank["resumed"] == {"error": None, "step": 2}
