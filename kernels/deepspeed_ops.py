"""DeepSpeed's JIT-built shared-memory comm op (`deepspeed_shm_comm`), built once for every checkout.

DeepSpeed builds the op, which its CPU collectives use, on the first `init_distributed` of a process,
under the fixed name `deepspeed_shm_comm` and with the sources' and torch's paths as this process
sees them. Processes of two checkouts (worktrees or clones linking one virtual environment, two
jobs on one home directory) therefore rebuilt it over each other at every switch: 50-85 s each on
this machine's 2 busy cores, in one folder whose library other processes were loading.

`share_deepspeed_op_builds()` makes DeepSpeed's `build_shm_op` load the op from a build shared by
every checkout of the same DeepSpeed, torch and flags (kernels/shared_builds.py) and hand it to
DeepSpeed's own cache of loaded ops; DeepSpeed then returns it as if it had built it. Where that
cannot be done (an op installed prebuilt, ROCm, a failed build) DeepSpeed builds it its own way.

DeepSpeed's `build_shm_op` prints "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built
successfully" after every load, a cached one included: every CPU start's output had it. That one
line is dropped; a failed build still raises, and any other output passes through.
"""

from __future__ import annotations

import contextlib
import re
import sys
import warnings
from pathlib import Path

SHM_BUILDER = "ShareMemCommBuilder"


def share_deepspeed_op_builds() -> None:
    """Route DeepSpeed's shm comm op through a shared build (once per process; call before
    `deepspeed.init_distributed` or `deepspeed.initialize`)."""
    import importlib

    # `import deepspeed.comm.torch as m` would give torch itself: deepspeed.comm has an attribute `torch`
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    original = getattr(ds_comm, "build_shm_op", None)
    if original is None or getattr(original, "memlayers_shared", False):
        return  # another DeepSpeed (it builds the op its own way), or done already

    def build_shm_op():
        _load_shm_op_into_deepspeed()
        with _without_line(re.compile(r"DeepSpeed \S+ built successfully")):
            return original()

    build_shm_op.memlayers_shared = True
    ds_comm.build_shm_op = build_shm_op


class _LineFilter:
    """A text stream passing complete lines on to `stream`, except those `pattern` matches in full."""

    def __init__(self, stream, pattern: re.Pattern):
        self.stream, self.pattern, self.pending = stream, pattern, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if not self.pattern.fullmatch(line):
                self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # fileno, encoding, isatty...: the stream's own
        return getattr(self.stream, name)


@contextlib.contextmanager
def _without_line(pattern: re.Pattern):
    """sys.stdout without the lines `pattern` matches in full, while the block runs."""
    stream = sys.stdout
    filtered = _LineFilter(stream, pattern)
    sys.stdout = filtered
    try:
        yield
    finally:
        sys.stdout = stream
        if filtered.pending and not pattern.fullmatch(filtered.pending):
            stream.write(filtered.pending)


def _loaded_ops(builder) -> dict:
    """DeepSpeed's cache of loaded ops (`OpBuilder._loaded_ops`), which `builder.load()` returns from."""
    for cls in type(builder).__mro__:
        if "_loaded_ops" in vars(cls):
            return cls._loaded_ops
    raise RuntimeError(f"{type(builder).__name__} has no _loaded_ops cache (another DeepSpeed version)")


def shm_build_inputs(builder):
    """The build DeepSpeed's `jit_load` would run, as shared-build inputs."""
    from kernels.shared_builds import BuildInputs

    return BuildInputs(
        builder.name,
        [Path(builder.deepspeed_src_path(p)) for p in builder.strip_empty_entries(builder.sources())],
        [Path(builder.deepspeed_src_path(p)) for p in builder.strip_empty_entries(builder.include_paths())],
        cflags=[*builder.strip_empty_entries(builder.cxx_args()), "-UC10_USE_GLOG"],  # as jit_load adds it
        ldflags=builder.strip_empty_entries(builder.extra_ldflags()),
        is_python_module=True,
    )


def _load_shm_op_into_deepspeed() -> None:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import installed_ops

    builder = get_accelerator().create_op_builder(SHM_BUILDER)
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # DeepSpeed does without the op
    if installed_ops.get(builder.name, False) or builder.is_rocm_pytorch():
        return  # installed prebuilt, or built with ROCm's extra flags: DeepSpeed's own way
    try:
        loaded = _loaded_ops(builder)
        if builder.name not in loaded:
            from kernels.shared_builds import load_shared_op

            loaded[builder.name] = load_shared_op(shm_build_inputs(builder))
    except Exception as err:
        warnings.warn(
            f"memlayers: DeepSpeed's {builder.name} op could not be built in a folder shared by checkouts "
            f"({type(err).__name__}: {err}); DeepSpeed builds it its own way (TORCH_EXTENSIONS_DIR/{builder.name}, "
            "rebuilt whenever a process of another checkout loads it)",
            stacklevel=3,
        )
