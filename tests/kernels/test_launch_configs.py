"""Pinned launch configurations (kernels.launch_configs): a pinned tuning key gets exactly
its configuration, other keys the usual candidates; MEMLAYERS_AUTOTUNE=all ignores pins."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from kernels import launch_configs as lc
from kernels import pkm_triton
from kernels.devices import PEAK_BANDWIDTH_TBS, sku_for


@triton.jit
def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


CANDIDATES = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((16, 1), (32, 2), (64, 4))]


def _launches(configs):
    return [(c.kwargs, c.num_warps) for c in configs]


@pytest.fixture
def tuner(monkeypatch):
    monkeypatch.setattr(lc, "TUNERS", {})
    monkeypatch.setattr(lc, "_device_sku", lambda index: "TEST GPU")
    monkeypatch.setitem(lc.PINNED, ("TEST GPU", "copy"), {(64, "torch.float32"): {"BLOCK": 32, "num_warps": 2}})
    tuner = lc.pinned_autotune("copy", CANDIDATES, key=["n"], prune=lambda configs, named, **kw: configs[::2])(_copy)
    assert lc.TUNERS["copy"] is tuner
    return tuner


def _prune(tuner, n, dtype=torch.float32):
    x = torch.zeros(4, dtype=dtype)
    tuner.nargs = {"x_ptr": x, "y_ptr": x, "n": n}
    return tuner.prune_configs({})


def test_pinned_key_gets_its_configuration_only(tuner, monkeypatch):
    monkeypatch.delenv("MEMLAYERS_AUTOTUNE", raising=False)
    assert _launches(_prune(tuner, 64)) == [({"BLOCK": 32}, 2)]
    assert lc.LAST_KEY["copy"] == (64, "torch.float32")
    assert lc.PINNED_HITS["copy"][-1] == str((64, "torch.float32"))


def test_unpinned_keys_are_tuned_over_the_pruned_candidates(tuner):
    assert _launches(_prune(tuner, 65)) == _launches(CANDIDATES[::2])
    assert _launches(_prune(tuner, 64, torch.bfloat16)) == _launches(CANDIDATES[::2])  # the dtype is in the key


def test_autotune_all_ignores_the_pins(tuner, monkeypatch):
    monkeypatch.setenv("MEMLAYERS_AUTOTUNE", "all")
    assert _launches(_prune(tuner, 64)) == _launches(CANDIDATES[::2])
    monkeypatch.setenv("MEMLAYERS_AUTOTUNE", "fastest")
    with pytest.raises(ValueError, match="MEMLAYERS_AUTOTUNE='fastest'"):
        _prune(tuner, 64)


def test_forced_configuration_is_restored(tuner):
    with lc.forced("copy", CANDIDATES[1]):
        assert tuner.configs == [CANDIDATES[1]]
    assert tuner.configs == CANDIDATES


def test_pins_name_known_gpus_and_candidate_launches():
    for (sku, kernel), entries in lc.PINNED.items():
        assert sku in PEAK_BANDWIDTH_TBS, f"PINNED names an unknown SKU {sku!r}"
        if kernel == "pkm_fwd":
            for spec in entries.values():
                assert (spec["BLOCK_T"], spec["BLOCK_N"], spec["num_warps"]) in pkm_triton.LAUNCHES


def test_a_measured_winner_round_trips_through_the_table(tuner, monkeypatch):
    """What --configs prints for a winner is a PINNED entry that yields that launch."""
    key = (65, "torch.float32")
    line = lc.table_entry("TEST GPU", "copy", key, CANDIDATES[2])
    assert line == "PINNED[('TEST GPU', 'copy')][(65, 'torch.float32')] = {'BLOCK': 64, 'num_warps': 4}"
    monkeypatch.setitem(lc.PINNED[("TEST GPU", "copy")], key, lc.launch_spec(CANDIDATES[2]))
    assert _launches(_prune(tuner, 65)) == _launches(CANDIDATES[2:])


@pytest.mark.parametrize(
    "name, sku",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),  # was "H100 SXM": 3.35 TB/s peak for a 3.9 TB/s card, its pins
        ("NVIDIA H200", "H200"),
        ("NVIDIA H200 NVL", "H200 NVL"),  # was "H200": the SXM card's pinned launch configurations
        ("NVIDIA GH200 480GB", None),  # was "H200": HBM3 or HBM3e, the name does not say which
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
        ("NVIDIA A10G", None),
    ],
)
def test_device_names_map_to_their_own_sku(name, sku):
    assert sku_for(name) == sku
    assert sku is None or sku in PEAK_BANDWIDTH_TBS
