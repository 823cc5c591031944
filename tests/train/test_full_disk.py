"""A checkpoint write that meets a really full filesystem: a 1000 KiB tmpfs mounted in a mount
namespace of the trainer's own (`unshare --mount`, root or a user namespace; skipped where neither
is allowed), which holds the first checkpoint of the tiny model (about 0.7 MiB) but not a second.

Measured before the fix: `error: rank 0 could not write checkpoint step_00000002 ([enforce fail at
inline_container.cc:672] . unexpected pos 247040 vs 246928; 0 MiB free on its filesystem); ...`:
torch's C++ writer drops the errno, and its own text led the message. The unfinished `.tmp-step_00000002`
was then left on the full filesystem until the next save; it is deleted now."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.helpers import TINY

REPO = Path(__file__).resolve().parents[2]

# $1 the mount point, $2 the interpreter, the rest the trainer's arguments; nothing is interpolated
_IN_A_FULL_TMPFS = """
set -u
mount -t tmpfs -o size="$SIZE" memlayers-full "$1" || exit 97
mnt=$1 py=$2
shift 2
"$py" -m pretrain.train "$@"
echo "exit status $?"
echo "latest: $(cat "$mnt/run/checkpoints/latest")"
echo "folders: $(ls -A "$mnt/run/checkpoints" | tr '\n' ' ')"
"""


def _unshare_prefix(mountpoint: Path) -> list[str] | None:
    """The command that runs a shell in a mount namespace of its own, where it may mount a tmpfs;
    None where this machine allows neither (not root, no user namespaces)."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--mount"], ["unshare", "--map-root-user", "--mount"]):
        probe = subprocess.run(
            [*prefix, "sh", "-c", 'mount -t tmpfs -o size=64k probe "$1"', "sh", str(mountpoint)],
            capture_output=True,
            timeout=30,
        )
        if probe.returncode == 0:
            return prefix
    return None


def test_a_full_filesystem_reads_as_one_message_naming_the_folder_and_the_fix(tmp_path, data_cache):
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    prefix = _unshare_prefix(mountpoint)
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (unshare --mount needs root or user namespaces)")
    run = mountpoint / "run"
    overrides = [*TINY, f"train.run_dir={run}", f"data.cache_dir={data_cache}"]
    overrides += ["train.max_steps=2", "train.checkpoint_every=1"]
    done = subprocess.run(
        [*prefix, "bash", "-c", _IN_A_FULL_TMPFS, "bash", str(mountpoint), sys.executable, *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "SIZE": "1000k", "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0 and "exit status 2" in done.stdout, done.stdout + done.stderr
    assert "latest: step_00000001" in done.stdout  # the first checkpoint stays the one that resumes
    # the unfinished second is deleted, not left holding room on the full disk until the next save
    (folders,) = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("folders:")]
    assert [f for f in folders if f.startswith(".tmp-")] == [] and "step_00000001" in folders, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, done.stderr
    root = run / "checkpoints"
    size = r"(0 MiB|\d+ KiB)"  # below 1 MiB
    assert re.fullmatch(
        rf"error: rank 0 could not write checkpoint step_00000002 in {re.escape(str(root))} \(its filesystem is "
        rf"full: {size} free there\); nothing else was changed: {re.escape(str(root / 'latest'))} still names "
        r"step_00000001, which is complete, and the unfinished \.tmp-step_00000002 is deleted\. "
        rf"Free space there \(it needs about {size}\), or give train\.run_dir a filesystem with room, then run "
        r"again: the run resumes from step_00000001(\. The writer's own words: .{1,160})?",
        errors[0],
    ), errors[0]
