"""`python -m pretrain.train` installs its stop handler before its heavy imports: USR1 while
torch is still loading is recorded, and the run checkpoints and stops after its first step
instead of dying of the signal (which, under Slurm, failed the job)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.train.helpers import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]


def catches(pid: int, signum: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (signum - 1) & 1)


@pytest.mark.slow
def test_usr1_during_imports_stops_after_the_first_step(tmp_path, data_cache):
    run = tmp_path / "run"
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pretrain.train",
            *TINY,
            "train.max_steps=3",
            f"train.run_dir={run}",
            f"data.cache_dir={data_cache}",
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # As soon as the handler is there (a fraction of a second; before it, the signal would kill
    # the interpreter), but no later than torch's import would finish even on a fast machine.
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and not catches(proc.pid, signal.SIGUSR1):
        time.sleep(0.005)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped at step 1 by signal" in out, out[-2000:]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_00000001"
