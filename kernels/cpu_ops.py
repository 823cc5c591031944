"""Compiled CPU ops (kernels/csrc/*.cpp) for the two hot loops torch ops do poorly on CPU.

* `row_topk_indices`: the top k of each row of scores (the half-key search of the
  PyTorch path). torch's CPU topk made it the largest part of a step that grows with the
  pool (74 ms of a 284 ms step at 16.7M slots; 39 ms with this op).
* `rowwise_adam_`: the row-wise lazy Adam update of `sparse_rowwise_adamw`, one pass over
  the rows read with the next rows prefetched, instead of three gathers and three
  scatters of random rows.
* `count_document_slots_`: a micro-batch's slot counts and document frequencies
  (pretrain/slots/counters.py) in one walk over the tokens, instead of sorting every
  (slot, occurrence) pair.

The library is built on first use with torch.utils.cpp_extension (~15 s with g++ and
ninja, the toolchain DeepSpeed's CPU ops need as well) into TORCH_EXTENSIONS_DIR, under a
name that carries torch's version and a digest of the sources, flags and torch install; later
processes, from any checkout with the same sources, load the built library without a build step
(kernels/shared_builds.py). If it cannot be built, the first call warns once, naming the reason,
and the callers take their torch path (the same results up to fp32 rounding and the choice among exactly tied scores, which
torch.topk makes in its own order; slower). MEMLAYERS_CPU_OPS=0 skips the
library (to compare the two paths).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.cpp"))
# no fused multiply-adds: every machine and instruction set computes the same bits
CFLAGS = ["-O3", "-ffp-contract=off"]
_loaded: bool | None = None  # None: not tried yet


def _build_inputs():
    from kernels.shared_builds import BuildInputs

    return BuildInputs("memlayers_cpu", SOURCES, cflags=CFLAGS)


def _library_name() -> str:
    """`memlayers_cpu_torch<version>_<digest>` of the sources, flags and torch install
    (kernels/shared_builds.py): checkouts that agree share one build, whatever their paths."""
    return _build_inputs().name


def available() -> bool:
    """Whether the compiled library is loaded (building it on the first call)."""
    global _loaded
    if _loaded is None:
        if os.environ.get("MEMLAYERS_CPU_OPS", "1") == "0":
            _loaded = False
            return False
        try:
            from kernels.shared_builds import load_shared_op

            # its own build only: another op's (DeepSpeed's, minutes under load) is not waited for
            load_shared_op(_build_inputs())
            _loaded = True
        except Exception as err:  # no compiler, no ninja, a read-only cache: fall back, say why
            warnings.warn(
                f"memlayers: the compiled CPU ops (kernels/csrc) could not be built ({type(err).__name__}: {err}); "
                "the CPU path uses torch ops instead (torch.topk, gathers and scatters: the same results up to "
                "fp32 rounding and ties, slower). Install g++ and ninja, or point TORCH_EXTENSIONS_DIR at a writable folder.",
                stacklevel=2,
            )
            _loaded = False
    return _loaded


def row_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor | None:
    """Indices (..., k) of the k largest scores along the last dim of a CPU tensor: the
    first k of `torch.sort(descending=True, stable=True)` (ties: lower index first, NaN
    first). None when the library is not available."""
    if not available():
        return None
    flat = scores.detach().reshape(-1, scores.shape[-1])
    return torch.ops.memlayers_cpu.row_topk(flat, k).reshape(*scores.shape[:-1], k)


def rowwise_adam_(param, exp_avg, exp_avg_sq_row, rows, grad, grad_sq, lr, beta1, beta2, eps, step) -> bool:
    """The row-wise lazy Adam update of `rows` (unique) in place, as
    `pretrain.parallel.sparse_adamw` defines it; returns False (nothing done) when the
    library is not available or the tensors are not contiguous fp32 CPU tables with an
    fp32 or bf16 first moment."""
    supported = (
        param.device.type == "cpu"
        and param.dtype == torch.float32
        and exp_avg.dtype in (torch.float32, torch.bfloat16)
        and all(t.is_contiguous() for t in (param, exp_avg, exp_avg_sq_row))
    )
    if not (supported and available()):
        return False
    # each scalar rounded to fp32 once from its double, as torch's ops receive them
    torch.ops.memlayers_cpu.rowwise_adam_(
        param,
        exp_avg,
        exp_avg_sq_row,
        rows,
        grad.float(),
        grad_sq.float(),
        1 - beta1,
        beta2,
        1 - beta2,
        1 - beta2**step,
        eps,
        -lr / (1 - beta1**step),
    )
    return True


def count_document_slots_(counts, doc_freq, last_occurrence, indices, order, valid, occurrence, stream) -> bool:
    """One micro-batch's slot counts, document frequencies and last occurrences, added in place as
    `SlotStatistics` (document granularity) defines them: indices (T, reads) slot ids per token in
    flat order, order (T,) the flat token at each stream-major position, valid (T,) per flat token,
    occurrence and stream (T,) per stream-major position. Returns False (nothing done) when the
    library is not available or a tensor is not on the CPU."""
    tensors = (counts, doc_freq, last_occurrence, indices, order, valid, occurrence, stream)
    if not (all(t.device.type == "cpu" for t in tensors) and available()):
        return False
    inputs = (indices.long(), order.long(), valid.bool(), occurrence.long(), stream.long())
    torch.ops.memlayers_cpu.count_document_slots_(counts, doc_freq, last_occurrence, *(t.contiguous() for t in inputs))
    return True
