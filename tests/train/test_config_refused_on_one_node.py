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
    errors = [p.stderr.read().strip().splitlines()[-1] for p in procs]
    refusal = f"data.dir={tmp_path / 'node1' / 'data'}"
    assert codes == [2, 2], errors
    assert errors[1].startswith("error: ") and refusal in errors[1]
    assert errors[0].startswith("error: rank 1 on ") and errors[0].endswith(errors[1][len("error: ") :])
    assert elapsed < 110  # waited 600 s at the rendezvous
    assert not (tmp_path / "run").exists()  # refused before anything was written
