"""A config refused on one node before the process group exists (its checks read node-local
files: that node's copy of data.dir) is refused on every rank, naming that rank and its host.
The other ranks used to wait at the rendezvous for its ranks, RENDEZVOUS_TIMEOUT_S (600 s), then
fail with the store's timeout, where no launcher ended them (torchrun; srun's --kill-on-bad-exit
does). Two `python -m pretrain.train` processes, as a launcher starts them."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pretrain.distributed import free_port
from tests.train.helpers import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_a_data_dir_missing_on_one_node_is_refused_on_every_rank(tmp_path, data_cache):
    data = next(Path(data_cache).glob("embedded-*"))
    port = free_port()
    procs = []
    for rank, data_dir in enumerate([data, tmp_path / "node1" / "data"]):  # node 1's copy is missing
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
            **dict(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)),
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO_ROOT),
        }
        args = [*TINY, "train.max_steps=1", f"train.run_dir={tmp_path / 'run'}", f"data.dir={data_dir}"]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "pretrain.train", *args], env=env, stderr=subprocess.PIPE, text=True
            )
        )
    start = time.monotonic()
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    elapsed = time.monotonic() - start
    stderr = [p.stderr.read() for p in procs]
    errors = [[line for line in err.splitlines() if line.startswith("error:")] for err in stderr]
    refusal = f"data.dir={tmp_path / 'node1' / 'data'}"
    assert codes == [2, 2], stderr
    # one line for the job, by rank 0, naming the rank that refused (each rank printed one)
    assert len(errors[0]) == 1 and errors[0][0].startswith("error: rank 1 on ") and refusal in errors[0][0], stderr
    assert errors[1] == [], stderr[1]
    assert elapsed < 110  # waited 600 s at the rendezvous
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_the_world_of_ranks_that_all_run_on_this_node():
    from pretrain.train_cli import world_on_this_node

    task = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "n1",
    }
    assert world_on_this_node({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}) == 4  # torchrun on one node
    assert world_on_this_node({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}) is None  # torchrun on 2 nodes
    assert world_on_this_node({"WORLD_SIZE": "4"}) is None  # a launcher that does not say
    assert world_on_this_node({**task, "SLURM_STEP_NUM_NODES": "1", "SLURM_STEP_NUM_TASKS": "2"}) == 2
    assert world_on_this_node({**task, "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NUM_TASKS": "2"}) is None
    assert world_on_this_node({**task, "SLURM_STEP_NUM_NODES": "1"}) is None  # no task count: distributed says
    assert world_on_this_node({}) is None


# a rank of a one-node launch, where torch cannot be imported: the refusal must come before it
_RANK_WITHOUT_TORCH = """
import sys
sys.modules["torch"] = None
sys.argv = ["memlayers-train", *sys.argv[1:]]
from pretrain import train_cli
train_cli.cli()
"""


def test_ranks_on_one_node_refuse_the_world_size_before_torch(tmp_path):
    """Under torchrun each rank imported torch, made the process group and began the build before
    model.memory.parallel_size or train.global_batch was checked against the world size (9.0-9.6 s to
    the refusal with 2 CPU ranks; 4.8-5.2 s now, 3.8 s of it torchrun's own start). The reference:
    the message, exit status 2, in a rank that cannot import torch, and nothing written. The node's
    local rank 0 alone prints it (every rank printed the same line: N lines for N ranks); every rank
    exits with status 2."""
    port = str(free_port())
    for override, message in (
        ("model.memory.parallel_size=4", "error: model.memory.parallel_size=4 must divide the world size 2: set "
         "model.memory.parallel_size=2"),
        ("train.micro_batch=8", "error: train.global_batch=8 is not divisible by train.micro_batch=8 x world size 2"),
    ):  # fmt: skip
        args = [*TINY, f"train.run_dir={tmp_path / 'run'}", override]
        for rank in (0, 1):
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
                **dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2"),
                **dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONPATH=str(REPO_ROOT)),
            }
            done = subprocess.run(
                [sys.executable, "-c", _RANK_WITHOUT_TORCH, *args], env=env, capture_output=True, text=True, timeout=60
            )
            assert done.returncode == 2, done.stderr[-2000:]
            if rank == 0:
                assert done.stderr.startswith(message), done.stderr[-2000:]
            else:
                assert "error" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "run").exists()
