"""Fixtures for the Slurm tests: a real one-node cluster (munge + slurmctld + slurmd), started
once per test session; skipped, with the reason, only where the packages are absent and
cannot be installed."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_cluster import LocalCluster, ensure_installed  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason is not None:
        print(f"SKIP Slurm cluster tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    yield cluster
    cluster.close()


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """The cluster's SLURM_CONF and PATH in this process's environment (for in-process sbatch)."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    return slurm_cluster
