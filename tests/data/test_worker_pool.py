"""pretrain/data/worker_pool.py: the tokenizer workers when the main process is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_KILLED_MAIN = """
import os, signal, time
from pretrain.data.worker_pool import ordered_map

def slow(x):
    time.sleep(0.5)
    return x

if __name__ == "__main__":
    for _ in ordered_map(slow, range(100), 2):
        print("first result", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # as kill -9 or the out-of-memory killer, the workers busy
"""


def test_workers_of_a_killed_main_process_end_quietly(tmp_path):
    """Measured before the fix: after SIGKILL of tools/prepare_data.py --workers 2, each worker printed
    two chained BrokenPipeError tracebacks (50 lines) on the user's terminal."""
    script = tmp_path / "killed_main.py"
    script.write_text(_KILLED_MAIN)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # the pipes reach EOF only once every worker has exited: a worker left running fails on the timeout
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    assert done.stdout == "first result\n"
    assert done.stderr == ""
