"""Small helpers shared by the Triton kernel modules: interpreter detection, sizes.

`INTERPRETING` is read once, when this module is imported, because Triton decides at
decoration time whether an `@triton.jit` function is compiled or interpreted.
Under the interpreter, kernels launch with one fixed configuration (the interpreter
cannot autotune over several).
"""

from __future__ import annotations

import os

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"kernel inputs are on different devices: {devices}")
    device = next(iter(devices.values()))
    if device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device}); use backend='torch' "
            "(config key memory.kernel) or set TRITON_INTERPRET=1 before importing kernels.*_triton"
        )
