"""Two torchrun "nodes" on this machine (`torchrun --nnodes=2 --nproc-per-node=1 --node-rank=0/1`, static
rendezvous on 127.0.0.1), each running `python -m pretrain.train`: the path where LOCAL_WORLD_SIZE differs
from WORLD_SIZE (the config read after the rendezvous, every node's local rank 0 checking its shards),
which no other test runs. Both nodes see one run directory, as on a shared filesystem."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.checkpoint import tag_for
from pretrain.distributed import free_port
from tests.train.helpers import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_two_torchrun_nodes_train_and_checkpoint_once(tmp_path, data_cache):
    port, run = free_port(), tmp_path / "run"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))},
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    args = [
        *TINY,
        "train.max_steps=2",
        "train.checkpoint_every=1",
        f"train.run_dir={run}",
        f"data.cache_dir={data_cache}",
    ]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc-per-node=1",
                f"--node-rank={node}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "pretrain.train",
                *args,
            ],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for node in range(2)
    ]
    try:
        outputs = [node.communicate(timeout=240) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (_out, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]
        assert "failed to bind" not in err, err[-3000:]  # rank 0 served a second store at the agent's port
    finished = [line for out, _ in outputs for line in out.splitlines() if line.startswith("finished at step")]
    assert finished == [f"finished at step 2; checkpoint {run / 'checkpoints' / tag_for(2)}"]
    last = run / "checkpoints" / tag_for(2)
    assert (run / "checkpoints" / "latest").read_text().strip() == tag_for(2)
    assert sorted(p.name for p in last.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]
