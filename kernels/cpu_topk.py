"""Row-wise top-k indices on CPU through a small compiled op (kernels/csrc/row_topk.cpp).

The PyTorch path's half-key search takes the top k of n_keys scores per (token, head);
torch's CPU topk made that the largest part of a step that grows with the pool (74 ms
of a 284 ms step at 16.7M slots). The op is built on first use with
torch.utils.cpp_extension (~10 s with g++ and ninja, the toolchain DeepSpeed's CPU ops
need as well) into TORCH_EXTENSIONS_DIR, under a name that carries torch's version, and
later processes load the cached library. Its results are fixed: descending, the lower
index first among ties, NaN first (`torch.sort(descending=True, stable=True)`'s order).

If it cannot be built, `row_topk_indices` warns once, naming the reason, and returns
None: callers then take torch.topk (same values, slower). MEMLAYERS_CPU_TOPK=0 skips
the op (to compare the two paths).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "row_topk.cpp"
_loaded: bool | None = None  # None: not tried yet


def _extension_name() -> str:
    return "memlayers_cpu_torch" + re.sub(r"\W", "_", torch.__version__)


def available() -> bool:
    """Whether the compiled op is loaded (building it on the first call)."""
    global _loaded
    if _loaded is None:
        if os.environ.get("MEMLAYERS_CPU_TOPK", "1") == "0":
            _loaded = False
            return False
        try:
            from torch.utils.cpp_extension import load

            load(name=_extension_name(), sources=[str(SOURCE)], extra_cflags=["-O3"], is_python_module=False)
            _loaded = True
        except Exception as err:  # no compiler, no ninja, a read-only cache: fall back, say why
            warnings.warn(
                f"memlayers: the CPU top-k op ({SOURCE.name}) could not be built ({type(err).__name__}: {err}); "
                "the product-key search uses torch.topk (same results, slower). Install g++ and ninja, or point "
                "TORCH_EXTENSIONS_DIR at a writable folder.",
                stacklevel=2,
            )
            _loaded = False
    return _loaded


def row_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor | None:
    """Indices (..., k) of the k largest scores along the last dim of a CPU tensor, in
    descending order (ties: lower index first); None when the op is not available."""
    if not available():
        return None
    flat = scores.detach().reshape(-1, scores.shape[-1])
    return torch.ops.memlayers_cpu.row_topk(flat, k).reshape(*scores.shape[:-1], k)
