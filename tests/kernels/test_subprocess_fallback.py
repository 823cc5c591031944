"""Runs this folder's kernel tests in a fresh interpreter when triton was already imported compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_interpreted_in_subprocess():
    here = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "MEMLAYERS_KERNEL_DEVICE": "cpu"}
    tests = [str(p) for p in sorted(here.glob("test_*.py")) if p.name != Path(__file__).name]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
        cwd=here.parents[1],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
