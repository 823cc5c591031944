"""The GPU a task uses under the bindings a cluster gives it (CUDA patched: no GPU here). A site that
binds one GPU per task (srun --gpus-per-task=1, --gpu-bind; CUDA_VISIBLE_DEVICES holding one device)
made every task but each node's first fail at start-up with CUDA's 'invalid device ordinal':
`torch.cuda.set_device(LOCAL_RANK)` asked for GPU 3 of the one GPU the task sees."""

from __future__ import annotations

import pytest
import torch

import pretrain.distributed as d


def start(monkeypatch, local_rank: int, gpus: int, visible: str | None) -> tuple[d.DistInfo, list[int]]:
    """init_distributed on task 5 of 8 (rank `local_rank` on its node) seeing `gpus` GPUs; the group
    exists already (only the device is chosen). The GPUs set_device was called with, which, like
    CUDA's, refuses an index the task does not see."""
    chosen = []

    def set_device(index: int) -> None:
        if not 0 <= index < gpus:
            raise RuntimeError("CUDA error: invalid device ordinal")
        chosen.append(index)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(d.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(d.dist, "get_rank", lambda group=None: 5)
    monkeypatch.setattr(d.dist, "get_world_size", lambda group=None: 8)
    monkeypatch.setattr(d, "_pointed_local_rank", None, raising=False)
    for key, value in dict(RANK=5, LOCAL_RANK=local_rank, WORLD_SIZE=8, MASTER_ADDR="n1", MASTER_PORT=12345).items():
        monkeypatch.setenv(key, str(value))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    return d.init_distributed(), chosen


def test_a_task_bound_to_one_gpu_uses_it(monkeypatch):
    info, chosen = start(monkeypatch, local_rank=3, gpus=1, visible="3")
    assert chosen == [0] and info.device == torch.device("cuda", 0)
    assert (info.rank, info.world_size, info.local_rank) == (5, 8, 3)  # still the task's rank on its node
    # DeepSpeed reads LOCAL_RANK as the device index (engine, ZeRO-3's partitions, the NCCL group)
    assert d.os.environ["LOCAL_RANK"] == "0"
    assert d.node_local_rank() == 3  # what the trainer's once-per-node work asks


def test_a_task_seeing_the_nodes_gpus_uses_its_rank_on_the_node(monkeypatch):
    info, chosen = start(monkeypatch, local_rank=2, gpus=4, visible=None)
    assert chosen == [2] and info.device == torch.device("cuda", 2) and info.local_rank == 2
    assert d.os.environ["LOCAL_RANK"] == "2"


def test_more_tasks_on_a_node_than_its_gpus_is_refused_naming_the_numbers(monkeypatch):
    with pytest.raises(RuntimeError) as err:
        start(monkeypatch, local_rank=5, gpus=4, visible="0,1,2,3")
    message = str(err.value)
    assert "invalid device ordinal" not in message
    for part in ("LOCAL_RANK=5", "sees 4 GPUs", "CUDA_VISIBLE_DEVICES=0,1,2,3", "--ntasks-per-node"):
        assert part in message, message
