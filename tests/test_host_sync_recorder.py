"""tests/host_syncs.py itself: which reads it records, and which it leaves to the host."""

from __future__ import annotations

import torch

from tests.host_syncs import HostSyncs


def test_reads_of_device_tensors_are_recorded_and_the_hosts_are_not():
    syncs = HostSyncs()
    host, device, rows = torch.zeros(4), torch.ones(4), torch.tensor([0, 1])
    syncs.mark_host(host, rows)
    with syncs:
        float(host.sum())  # the host's own tensor: no wait on a GPU
        int(rows.sum())
        host.index_copy_(0, rows, device[:2])  # now holds device data: the device's
        float(host.sum())
        int(rows.sum())  # only read by that copy: still the host's
        device.tolist()  # no aten op on a CPU tensor: the function mode sees it
        device[device > 0]  # boolean indexing: a nonzero inside
        torch.bincount(rows + device.long()[:2])  # sized on the host
        with syncs.host_work():
            torch.arange(3).tolist()  # the loader's work
    assert [s.what for s in syncs.syncs] == [
        "aten._local_scalar_dense.default",
        "Tensor.tolist",
        "aten.index.Tensor",
        "aten.bincount.default",
    ]


def test_a_custom_ops_body_is_watched(monkeypatch):
    """memlayers::embedding_bag is one op to a dispatch mode; its body's read (the public range
    check, on the Triton path) is found inside it."""
    import kernels.ops

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels were loaded interpreted (tests/triton_mode.py)
    values, weights = torch.randn(10, 4), torch.rand(3, 2, 2)
    indices = torch.randint(0, 10, (3, 2, 2))
    with HostSyncs() as syncs:
        kernels.ops.embedding_bag(values, indices, weights, backend="triton")
    assert [s.stack[-1].rsplit(" in ", 1)[1] for s in syncs.syncs] == ["_check"]
    assert any("kernels/ops.py" in frame for frame in syncs.syncs[0].stack)
