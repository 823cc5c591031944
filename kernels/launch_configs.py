"""Launch configurations of the autotuned Triton kernels: measured winners, pinned per GPU.

Triton's autotuner times every candidate the first time a kernel meets a new tuning key
in a process and keeps the fastest. Near-equal candidates make that pick differ from
process to process, and a candidate that wins the short tuning run can be slower or
bimodal in the steady state (the d=1024 bag forward of the 17b4615 H100 run). So the
configuration measured as the steady winner (`tools/bench_kernels.py --configs` times
every candidate with p20/p50/p80) is pinned in PINNED, keyed by GPU SKU
(kernels.devices.sku_for), kernel and tuning key. A pinned key skips tuning: the
pruning hook hands the autotuner that one configuration, which it runs without
benchmarking. Unpinned keys are autotuned as before, with Triton's on-disk cache of
tuning results where this Triton has one, so later processes on the same machine reuse
the first one's choice.

MEMLAYERS_AUTOTUNE=all ignores the pins (to re-measure them); the tuning key is the
kernel's `key` arguments followed by the dtype of its first tensor argument. Triton 3.9
runs a single surviving configuration without timing it; 3.6 times it once per key.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os

import triton

from kernels.devices import sku_for

# (SKU, kernel) -> {tuning key: config}. Config: the kernel's block sizes and num_warps.
PINNED: dict[tuple[str, str], dict[tuple, dict]] = {
    # Fused scoring forward at the paper's shape (n_keys 1024, k 32, half 128, bf16):
    # scoring_configs.json of the fefa58e run, p50 3.741 ms (p80/p20 1.03); next 3.940.
    ("H100 SXM", "pkm_fwd"): {
        (1024, 32, 128, False, "torch.bfloat16"): {"BLOCK_T": 16, "BLOCK_N": 16, "num_warps": 1},
    },
    # H200, launch_configs.json of the abf31f5 run (benchmarks/h200.md): each winner's p50 (ms)
    # and the next candidate's; the same winners the bench's own autotuning picked, except
    # pkm_bwd_rows (a tie within 0.5%).
    ("H200", "pkm_fwd"): {  # 4.040; next 4.250
        (1024, 32, 128, False, "torch.bfloat16"): {"BLOCK_T": 16, "BLOCK_N": 16, "num_warps": 1},
    },
    ("H200", "pkm_bwd_rows"): {  # 1.345; next 1.351
        (1024, 32, 128, "torch.bfloat16"): {"BLOCK_T": 8, "num_warps": 4},
    },
    ("H200", "pkm_bwd_keys"): {  # 1.363; next 1.383
        (1024, 32, 128, "torch.bfloat16"): {"BLOCK_E": 32, "num_warps": 4},
    },
    ("H200", "bag_fwd"): {  # d=1024: 2.121, next 3.087; d=2048: 4.180, next 6.006
        (128, 1024, "torch.bfloat16"): {"BLOCK_T": 1, "BLOCK_J": 8, "BLOCK_D": 1024, "num_warps": 4},
        (128, 2048, "torch.bfloat16"): {"BLOCK_T": 1, "BLOCK_J": 8, "BLOCK_D": 1024, "num_warps": 4},
    },
    ("H200", "bag_bwd_sorted"): {  # d=1024: 4.338, next 5.139; d=2048: 7.168, next 8.706
        (1024, True, True, "torch.bfloat16"): {"BLOCK_E": 2, "num_warps": 4},
        (2048, True, True, "torch.bfloat16"): {"BLOCK_E": 2, "num_warps": 4},
    },
}


def autotune_mode() -> str:
    mode = os.environ.get("MEMLAYERS_AUTOTUNE", "pinned")
    if mode not in ("pinned", "all"):
        raise ValueError(f"MEMLAYERS_AUTOTUNE={mode!r} must be 'pinned' (use PINNED where it has an entry) or 'all'")
    return mode


@functools.lru_cache(maxsize=None)
def _device_sku(index: int) -> str | None:
    import torch

    return sku_for(torch.cuda.get_device_name(index))


def tuning_key(key_names, named_args: dict) -> tuple:
    tensors = [v for v in named_args.values() if hasattr(v, "dtype") and hasattr(v, "data_ptr")]
    return tuple(named_args[k] for k in key_names) + ((str(tensors[0].dtype),) if tensors else ())


def pinned_config(kernel: str, key: tuple, device_index: int) -> triton.Config | None:
    """The pinned configuration for this kernel, tuning key and device, if any."""
    if autotune_mode() == "all":
        return None
    entry = PINNED.get((_device_sku(device_index), kernel), {}).get(key)
    if entry is None:
        return None
    entry = dict(entry)
    warps, stages = entry.pop("num_warps"), entry.pop("num_stages", None)
    return triton.Config(entry, num_warps=warps, **({} if stages is None else {"num_stages": stages}))


def launch_spec(config) -> dict:
    """A configuration as a PINNED value: its block sizes and num_warps."""
    return {**config.kwargs, "num_warps": config.num_warps}


def table_entry(sku: str | None, kernel: str, key: tuple, config) -> str:
    """A measured winner as a line to paste (printed by tools/bench_kernels.py --configs)."""
    return f"PINNED[({sku!r}, {kernel!r})][{key!r}] = {launch_spec(config)!r}"


# Per kernel: its autotuner, the tuning keys served from PINNED in this process, and the
# last tuning key it met (tools/bench_kernels.py --configs reads all three).
TUNERS: dict = {}
PINNED_HITS: dict[str, list] = {}
LAST_KEY: dict[str, tuple] = {}


def pinned_autotune(kernel: str, configs, key, prune=None):
    """`triton.autotune(configs, key)` that first looks the launch up in PINNED.

    `prune(configs, named_args, **kwargs)` is an optional further early pruning step for
    unpinned keys.
    """

    def early_prune(candidates, named_args, **kwargs):
        args = {**named_args, **kwargs}
        tensors = [v for v in named_args.values() if hasattr(v, "data_ptr")]
        index = tensors[0].device.index if tensors and tensors[0].device.index is not None else 0
        tkey = tuning_key(key, args)
        LAST_KEY[kernel] = tkey
        pinned = pinned_config(kernel, tkey, index)
        if pinned is not None:
            PINNED_HITS.setdefault(kernel, []).append(str(tkey))
            return [pinned]
        return prune(candidates, named_args, **kwargs) if prune else candidates

    extra = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    decorate = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": early_prune}, **extra)

    def register(fn):
        TUNERS[kernel] = decorate(fn)
        return TUNERS[kernel]

    return register


@contextlib.contextmanager
def forced(kernel: str, config):
    """Launch `kernel` with `config` only while inside (an autotuner holding a single
    configuration runs it without tuning or caching)."""
    tuner = TUNERS[kernel]
    saved = tuner.configs
    tuner.configs = [config]
    try:
        yield
    finally:
        tuner.configs = saved
