"""tools/compile_kernels.py: the Triton kernels compiled for sm_90 without a GPU (bundled ptxas)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scoring_backward_compiles_for_sm90_without_spills(tmp_path):
    """Every launch candidate of the scoring backward's key pass and chunk sum compiles to
    a cubin, and the resource usage read back from it is plausible and spill-free."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [
            sys.executable,
            "tools/compile_kernels.py",
            "--kernels",
            "pkm_bwd_keys",
            "pkm_bwd_sum_chunks",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    launches = json.loads(out.read_text())["launches"]
    assert len(launches) == 5  # the key pass's 4 candidates, the chunk sum's 1
    for launch in launches:
        assert "error" not in launch, launch
        assert 0 < launch["registers"] <= 255 and launch["stack_bytes"] == 0, launch
    assert "5 of 5 launches compiled" in result.stdout


def test_refuses_to_run_interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "tools/compile_kernels.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0 and "unset TRITON_INTERPRET" in result.stderr


def test_a_folder_as_json_is_refused_before_compiling(tmp_path):
    """--json naming a folder compiled every launch (74 s on 2 cores) and then crashed in the
    rename with IsADirectoryError; it is refused when the arguments are parsed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "tools/compile_kernels.py", "--json", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "triton" not in result.stdout  # nothing compiled
    assert f"argument --json: {tmp_path} is a folder: name the file to write" in result.stderr
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []
