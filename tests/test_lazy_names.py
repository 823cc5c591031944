"""The packages whose names load on first use (pretrain/lazy_names.py: pretrain.model, pretrain.data)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("package", ["pretrain.model", "pretrain.data"])
def test_a_lazy_package_lists_its_names_and_loads_each_from_its_module(package):
    """dir() of pretrain.model (a8db883) lacked every name of its __all__ (ModelConfig, Transformer, ...)
    until first used, so tab completion and help() showed none; pretrain.data's had its own __dir__.
    Both list them since 76f6046 (lazy_names), which no test checked: this one, without importing
    torch, and each name is the object its module defines."""
    script = (
        "import importlib, sys\n"
        f"package = importlib.import_module({package!r})\n"
        "print(sorted(set(package.__all__) - set(dir(package))))\n"
        "print('torch' in sys.modules)\n"
        "namespace = {}\n"
        f"exec('from {package} import *', namespace)\n"
        "wrong = [n for n in package.__all__ if namespace[n] is not getattr(\n"
        "    importlib.import_module(f'{package.__name__}.{package._MODULE_OF[n]}'), n)]\n"
        "print(wrong)\n"
        "try:\n"
        "    package.NoSuchName\n"
        "except AttributeError as err:\n"
        "    print(err)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["[]", "False", "[]", f"module {package!r} has no attribute 'NoSuchName'"], (
        done.stdout + done.stderr
    )
