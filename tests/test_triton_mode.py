"""The kernel tests run interpreted in the suite's own process, whatever test module is collected
before tests/kernels/: one importing transformers (-> torch._dynamo -> triton) at module level,
tests/export/test_hf_memory_lookup.py, loaded triton compiled ahead of the kernels' conftest, and
135 kernel tests were skipped there and run in a subprocess instead (CI of f449089)."""

from __future__ import annotations

import os
import subprocess
import sys

COLLECTION_ORDER = """
import importlib.util, sys

def load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

load("tests/conftest.py", "conftest")
import transformers.modeling_utils  # what a test module collected before tests/kernels imports
kernels_conftest = load("tests/kernels/conftest.py", "kernels_conftest")
from kernels import triton_common
print(kernels_conftest.SUBPROCESS_FALLBACK, triton_common.INTERPRETING)
"""


def test_a_transformers_import_at_collection_leaves_the_kernel_tests_in_process(repo_root):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MEMLAYERS_KERNEL_DEVICE")}
    env["PYTHONPATH"] = str(repo_root)
    result = subprocess.run(
        [sys.executable, "-c", COLLECTION_ORDER], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["False", "True"]  # no subprocess fallback; kernels interpreted
