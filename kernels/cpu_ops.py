"""Compiled CPU ops (kernels/csrc/*.cpp) for the two hot loops torch ops do poorly on CPU.

* `row_topk_indices`: the top k of each row of scores (the half-key search of the
  PyTorch path). torch's CPU topk made it the largest part of a step that grows with the
  pool (74 ms of a 284 ms step at 16.7M slots; 39 ms with this op).
* `rowwise_adam_`: the row-wise lazy Adam update of `sparse_rowwise_adamw`, one pass over
  the rows read with the next rows prefetched, instead of three gathers and three
  scatters of random rows.

The library is built on first use with torch.utils.cpp_extension (~15 s with g++ and
ninja, the toolchain DeepSpeed's CPU ops need as well) into TORCH_EXTENSIONS_DIR, under a
name that carries torch's version and a digest of the sources, flags and torch install; later
processes, from any checkout with the same sources, load the cached library. If it cannot
be built, the first call warns once, naming the reason, and the callers take their torch
path (the same results up to fp32 rounding and the choice among exactly tied scores, which
torch.topk makes in its own order; slower). MEMLAYERS_CPU_OPS=0 skips the
library (to compare the two paths).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.cpp"))
# no fused multiply-adds: every machine and instruction set computes the same bits
CFLAGS = ["-O3", "-ffp-contract=off"]
_loaded: bool | None = None  # None: not tried yet


def _library_name() -> str:
    """torch's version and a digest of what the build reads: the sources, the flags and the torch
    install whose headers it includes. Checkouts that agree share one build; one that differs
    (another commit's kernels/csrc, another virtual environment) gets its own, instead of each
    rebuilding over the other's at every switch."""
    digest = hashlib.sha256(repr((CFLAGS, str(Path(torch.__file__).parent))).encode())
    for source in SOURCES:
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    version = re.sub(r"\W", "_", torch.__version__)
    return f"memlayers_cpu_torch{version}_{digest.hexdigest()[:12]}"


def _staged_sources(build_dir: Path) -> list[str]:
    """The sources copied (atomically, once) into the build folder, so the build names the same
    files from every checkout: ninja rebuilds when a command line changes, and the checkout's path
    is in it."""
    from pretrain.files import atomic_write  # temporaries distinct per host: TORCH_EXTENSIONS_DIR may be shared

    staged = build_dir / "src"
    staged.mkdir(parents=True, exist_ok=True)
    for source in SOURCES:
        target = staged / source.name
        if not target.is_file():  # the name's digest covers the content: an existing copy is this one
            atomic_write(target, source.read_bytes())
    return [str(staged / source.name) for source in SOURCES]


def available() -> bool:
    """Whether the compiled library is loaded (building it on the first call)."""
    global _loaded
    if _loaded is None:
        if os.environ.get("MEMLAYERS_CPU_OPS", "1") == "0":
            _loaded = False
            return False
        try:
            from torch.utils.cpp_extension import load

            from kernels.build_locks import clear_stale_build_locks, extensions_root

            name = _library_name()
            # its own lock only: another op's build (DeepSpeed's, minutes under load) is not waited for
            clear_stale_build_locks(say=lambda line: warnings.warn(f"memlayers: {line}", stacklevel=3), ops=[name])
            build_dir = extensions_root() / name
            load(
                name=name,
                sources=_staged_sources(build_dir),
                extra_cflags=CFLAGS,
                build_directory=str(build_dir),
                is_python_module=False,
            )
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
