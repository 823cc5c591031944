"""Where code under test makes the host wait for the accelerator, found on the CPU.

On a GPU, reading a device tensor's value on the host (`item()`, `bool()`, `float()`, `tolist()`,
`.cpu()`, `.numpy()`) and the ops whose output size depends on the data (`nonzero`, boolean
indexing, `unique`, `bincount`, `repeat_interleave` without `output_size`, `equal`) wait for every
queued kernel: the CPU stops launching and the GPU runs dry. On the CPU nothing waits, but the same
calls still happen, so `HostSyncs` records them there, each with its call stack:

  * a TorchDispatchMode sees the aten ops (`_local_scalar_dense` is what every scalar read
    becomes; the data-dependent-shape ops by name);
  * a TorchFunctionMode sees `tolist`, `numpy`, `cpu` and `to("cpu")`, which on a CPU tensor
    reach no aten op at all;
  * a torch.library custom op (the memory kernels' `memlayers::*`) is one op to a dispatch mode,
    its body unseen: the mode runs the body itself, under both modes.

Tensors the host owns in a GPU run too (the loader's batches, before `.to(device)`) are no
sync to read: `mark_host` names them, and an op whose tensor inputs are all host tensors makes
host tensors. A read of anything else is recorded.
"""

from __future__ import annotations

import contextlib
import sys
import traceback
from dataclasses import dataclass

import torch
from torch._library.custom_ops import _maybe_get_opdef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

aten = torch.ops.aten

# Every scalar read ends in _local_scalar_dense; below autograd (inside a custom op) the
# composite item / is_nonzero arrive whole.
SCALAR_READS = {aten._local_scalar_dense.default, aten.item.default, aten.is_nonzero.default}
# Output size known only after the data is read: the op waits for the device.
DATA_DEPENDENT_SHAPE = {
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.unique_dim.default,
    aten.bincount.default,
    aten.equal.default,
}
HOST_COPIES = {"tolist", "numpy", "cpu", "__array__"}
ROOT = __file__.rsplit("/tests/", 1)[0] + "/"


@dataclass(frozen=True)
class Sync:
    """One host read: what it was and where (the project's frames, innermost last)."""

    what: str
    stack: tuple[str, ...]
    origin: str  # the innermost Python frame: the call itself, in a library too

    @property
    def site(self) -> str:
        """The innermost project frame outside this module: file:line in function."""
        return self.stack[-1] if self.stack else "?"

    def __str__(self) -> str:
        return f"{self.what} at {self.site} ({self.origin})\n    " + "\n    ".join(self.stack)


def _stack() -> tuple[tuple[str, ...], str]:
    """(the project's frames outside tests/, outermost first; the innermost frame outside torch)"""
    frames, origin = [], "?"
    for f in traceback.extract_stack()[:-3]:
        if "/torch/" not in f.filename and not f.filename.endswith("tests/host_syncs.py"):
            origin = f"{f.filename}:{f.lineno} in {f.name}"
        if f.filename.startswith(ROOT) and not f.filename.startswith(ROOT + "tests/") and "/.venv/" not in f.filename:
            frames.append(f"{f.filename[len(ROOT) :]}:{f.lineno} in {f.name}")
    return tuple(frames), origin


def _tensors(args, kwargs) -> list[torch.Tensor]:
    return [a for a in tree_flatten((args, kwargs or {}))[0] if isinstance(a, torch.Tensor)]


class _AtenSide(TorchDispatchMode):
    def __init__(self, owner: HostSyncs):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = _tensors(args, kwargs)
        opdef = _maybe_get_opdef(func)
        if opdef is not None:  # a torch.library custom op: its Python body, watched by both modes
            with self.owner.python_side, self:
                return opdef._init_fn(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        owner = self.owner
        if owner.host_side:
            for t in _tensors(out, None):
                owner.set_host(t, True)
            return out
        if func in SCALAR_READS or func in DATA_DEPENDENT_SHAPE or _bool_index(func, inputs):
            if not owner.on_host(inputs):
                owner.record(str(func))
        elif func is aten.repeat_interleave.Tensor and (kwargs or {}).get("output_size") is None:
            if not owner.on_host(inputs):
                owner.record(str(func))
        elif func in (aten._to_copy.default, aten.copy_.default) and _device_to_host(func, inputs, out):
            owner.record(str(func))  # seen on a GPU only: on the CPU every tensor is the host's
        if inputs:
            host = owner.on_host(inputs)
            for t in _tensors(out, None):
                owner.set_host(t, host)
            if not host:  # an in-place op writing device data into a host tensor makes it the device's
                for arg, value in zip(func._schema.arguments, args):
                    if isinstance(value, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write:
                        owner.set_host(value, False)
        return out


def _device_to_host(func, inputs, out) -> bool:
    """A copy from an accelerator into host memory (`.cpu()` and the like, inside C++ too)."""
    source = inputs[1] if func is aten.copy_.default else inputs[0]
    target = inputs[0] if func is aten.copy_.default else out
    return source.device.type != "cpu" and target.device.type == "cpu"


def _bool_index(func, inputs) -> bool:
    """Boolean-mask indexing (x[mask], x[mask] = v): a nonzero inside the kernel."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
        return False
    return any(t.dtype in (torch.bool, torch.uint8) for t in inputs[1:])


class _PythonSide(TorchFunctionMode):
    def __init__(self, owner: HostSyncs):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.owner.host_side:
            pass
        elif name in HOST_COPIES or (name == "to" and _to_cpu(args[1:], kwargs or {}) and _called_from_project()):
            inputs = _tensors(args[:1], None)
            if inputs and not self.owner.on_host(inputs):
                self.owner.record(f"Tensor.{name}")
        return func(*args, **(kwargs or {}))


def _called_from_project() -> bool:
    caller = sys._getframe(2).f_code.co_filename
    return caller.startswith(ROOT) and "/.venv/" not in caller


def _to_cpu(args, kwargs) -> bool:
    """`.to("cpu")`: the host by name, in the project's own code. A torch.device("cpu") is left
    out: on the CPU it is also what a run's own device (`DistInfo.device`) is, the accelerator in
    a GPU run; so is a library's call, which names the accelerator by a string that is "cpu" on
    the CPU (DeepSpeed's `current_device_name()`)."""
    target = kwargs.get("device", args[0] if args else None)
    return isinstance(target, str) and target.split(":")[0] == "cpu"


class HostSyncs:
    """Records every host read of a non-host tensor while entered (`syncs`, in order)."""

    def __init__(self):
        self.syncs: list[Sync] = []
        self.host_side = False  # in `host_work`
        self._host = WeakIdKeyDictionary()
        self.python_side = _PythonSide(self)
        self._modes = (self.python_side, _AtenSide(self))

    def mark_host(self, *tensors: torch.Tensor) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._host[t] = True

    @contextlib.contextmanager
    def host_work(self):
        """Work that stays on the host in a GPU run too (the data loader's): its reads are not
        recorded and the tensors it makes are host tensors."""
        self.host_side = True
        try:
            yield
        finally:
            self.host_side = False

    def set_host(self, t: torch.Tensor, host: bool) -> None:
        if host:
            self._host[t] = True
        else:
            self._host.pop(t, None)

    def on_host(self, tensors: list[torch.Tensor]) -> bool:
        return bool(tensors) and all(t in self._host for t in tensors)

    def record(self, what: str) -> None:
        self.syncs.append(Sync(what, *_stack()))

    def __enter__(self) -> HostSyncs:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def report(self) -> str:
        return "\n".join(str(s) for s in self.syncs) or "no host syncs"
