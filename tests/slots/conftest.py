"""The two ways `SlotStatistics` counts a micro-batch at the document granularity: the compiled
walk over the tokens (kernels/csrc/slot_counts.cpp, the CPU path) and the sorted (slot, unit)
pairs (the device path, and the CPU's where the library cannot be built). Tests that use
`counting_path` run once with each, against the same brute force, each path forced: the other
one raises if it is reached."""

from __future__ import annotations

import pytest

from kernels import cpu_ops
from pretrain.slots.counters import SlotStatistics


@pytest.fixture(params=["compiled walk", "sorted pairs"])
def counting_path(request, monkeypatch):
    if request.param == "compiled walk":
        request.getfixturevalue("cpu_ops_built")

        def unexpected(*args, **kwargs):
            raise AssertionError("the sorted-pairs path ran although the compiled walk is available on the CPU")

        monkeypatch.setattr(SlotStatistics, "_count_documents_sorted", unexpected)
    else:
        monkeypatch.setattr(cpu_ops, "count_document_slots_", lambda *args: False)
    return request.param
