"""A package's public names imported from their modules on first use (PEP 562 module `__getattr__`), so
that importing one light module of the package (pretrain.model.config, pretrain.data.tokenizer) does not
import its heavy siblings, and with them torch (seconds)."""

from __future__ import annotations

import importlib
import sys


def lazy_names(package: str, module_of: dict[str, str]):
    """The `__getattr__` and `__dir__` of `package`, whose public name N is defined in `package.<module_of[N]>`."""

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *module_of})

    return __getattr__, __dir__
