"""The memory group's collectives call no torch name that warns of its deprecation."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys, warnings
import torch, torch.distributed as dist
from pretrain.parallel.comm import CommCounter, exchange_counts
from pretrain.parallel.row_grads import reduce_over_replicas
dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
warnings.simplefilter("error")  # torch 2.13's FutureWarning for all_gather_into_tensor becomes an error
assert exchange_counts(3, None, CommCounter(), "cpu") == [3]
rows, summed, _ = reduce_over_replicas(torch.tensor([0, 2]), torch.tensor([[1.0, 2.0], [3.0, 4.0]]), None)
assert rows.tolist() == [0, 2] and summed.tolist() == [[1.0, 2.0], [3.0, 4.0]], (rows, summed)
dist.destroy_process_group()
print("ok")
"""


def test_the_memory_group_collectives_warn_of_no_deprecated_torch_name(repo_root, tmp_path):
    # torch 2.13 printed "`torch.distributed.all_gather_into_tensor` is deprecated" once per rank
    # of every memory-parallel run (pretrain/parallel/comm.py keeps the old name for torch 2.11)
    done = subprocess.run(
        [sys.executable, "-c", CODE, str(tmp_path / "store")],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
