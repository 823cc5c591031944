"""The mode Triton's kernels load in for a test process: interpreted on CPU (TRITON_INTERPRET=1),
compiled on CUDA (MEMLAYERS_KERNEL_DEVICE=cuda, tools/gpu_check.sh).

Triton decides at decoration time whether a kernel is interpreted, its own triton.language helpers
included, which are decorated when triton is first imported. transformers imports torch._dynamo,
which imports triton: a test module importing transformers at collection, ahead of tests/kernels/,
loaded triton compiled, and every kernel test then ran in a subprocess instead. So the root
conftest loads the kernels here first, and tests/kernels/conftest.py asks whether it did.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

KERNEL_DEVICE = os.environ.get("MEMLAYERS_KERNEL_DEVICE", "cpu")
KERNEL_MODULES = ("kernels.triton_common", "kernels.pkm_bwd_triton", "kernels.pkm_triton", "kernels.bag_triton")

# True once load_kernels(interpret=True) imported triton itself: its helpers are interpreted.
triton_loaded_interpreted = False


def load_kernels(interpret: bool) -> None:
    """(Re)import the kernel modules with TRITON_INTERPRET set as asked, restoring it afterwards so
    the variable does not leak into the rest of the suite (Triton also reads it lazily at launch)."""
    global triton_loaded_interpreted
    first_import = "triton" not in sys.modules
    previous = os.environ.get("TRITON_INTERPRET")
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        for name in KERNEL_MODULES:
            module = sys.modules.get(name)
            if module is not None:
                importlib.reload(module)
            else:
                importlib.import_module(name)
        from kernels import triton_common

        if triton_common.INTERPRETING != interpret:
            raise RuntimeError("kernel modules did not load in the requested (interpreted/compiled) mode")
        if interpret and first_import:
            triton_loaded_interpreted = True
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def load_interpreted_before_collection() -> None:
    """For the root conftest: on CPU, with triton installed and not imported yet, load it interpreted."""
    if KERNEL_DEVICE == "cpu" and "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
        load_kernels(interpret=True)
