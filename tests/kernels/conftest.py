"""Run the Triton kernel tests interpreted on CPU, or compiled on CUDA.

MEMLAYERS_KERNEL_DEVICE=cuda runs the same tests compiled on the GPU (tools/gpu_check.sh);
the default "cpu" interprets the kernels (TRITON_INTERPRET=1). Triton decides at
decoration time whether a kernel is interpreted, so the variable is set only while
the kernel modules are imported and while this folder's tests run (Triton also reads
it lazily at launch), and restored otherwise: it does not leak into the rest of the suite.
"""

from __future__ import annotations

import os
import sys

import pytest

from tests import triton_mode

KERNEL_DEVICE = triton_mode.KERNEL_DEVICE
if KERNEL_DEVICE not in ("cpu", "cuda"):
    raise pytest.UsageError(f"MEMLAYERS_KERNEL_DEVICE={KERNEL_DEVICE!r} must be cpu or cuda")

# triton.language's own jit helpers are also decorated at import: if triton was imported compiled
# before the root conftest could load it interpreted (tests/triton_mode.py), the interpreter cannot
# run them in this process, and the kernel tests then run in a fresh subprocess instead
# (test_interpreted_in_subprocess).
SUBPROCESS_FALLBACK = (
    KERNEL_DEVICE == "cpu"
    and "triton" in sys.modules
    and not os.environ.get("TRITON_INTERPRET")
    and not triton_mode.triton_loaded_interpreted
)

if not SUBPROCESS_FALLBACK:
    pytest.importorskip("triton")
    triton_mode.load_kernels(interpret=KERNEL_DEVICE == "cpu")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        in_here = str(item.path).startswith(here + os.sep)
        is_fallback = item.name == "test_interpreted_in_subprocess"
        if in_here and SUBPROCESS_FALLBACK and not is_fallback:
            item.add_marker(
                pytest.mark.skip(reason="triton was imported compiled; run by test_interpreted_in_subprocess")
            )
        if in_here and is_fallback and not SUBPROCESS_FALLBACK:
            item.add_marker(pytest.mark.skip(reason="kernels already interpreted in this process"))


@pytest.fixture(autouse=True)
def _interpret_while_testing(monkeypatch):
    """Triton reads TRITON_INTERPRET lazily too (at launch): set it for this folder's tests only."""
    if KERNEL_DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    import torch

    if KERNEL_DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("MEMLAYERS_KERNEL_DEVICE=cuda but no CUDA device")
    return torch.device(KERNEL_DEVICE)


@pytest.fixture
def poison_empty(monkeypatch):
    """Call it to make torch.empty fill floating-point tensors with NaN from then on, so that an
    output element a kernel should write but skips reads NaN instead of a lucky zero."""
    import torch

    def poison() -> None:
        real_empty = torch.empty

        def poisoned_empty(*args, **kwargs):
            t = real_empty(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        monkeypatch.setattr(torch, "empty", poisoned_empty)

    return poison
