"""Fixtures for the Slurm tests: a real one-node cluster (munge + slurmctld + slurmd), started
once per test session; skipped, with the reason, only where the packages are absent and
cannot be installed."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_cluster import HELD_DEFAULT_PORTS, LocalCluster, ensure_installed  # noqa: E402


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """The cluster, while this process listens on the default rendezvous ports of its first
    jobs (another job or service on the node): every job must find a free port itself."""
    reason = ensure_installed()
    if reason is not None:
        print(f"SKIP Slurm cluster tests: {reason}", file=sys.stderr)
        pytest.skip(reason)
    held = hold_ports(HELD_DEFAULT_PORTS)
    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except BaseException:
        cluster.close()
        raise
    try:
        yield cluster
    finally:
        cluster.close()
        for sock in held:
            sock.close()


def hold_ports(ports) -> list[socket.socket]:
    """Listening sockets on those of `ports` that are free now."""
    held = []
    for port in ports:
        sock = socket.socket()
        try:
            sock.bind(("", port))
            sock.listen(1)
            held.append(sock)
        except OSError:
            sock.close()
    return held


@pytest.fixture
def slurm_env(slurm_cluster, monkeypatch):
    """The cluster's SLURM_CONF and PATH in this process's environment (for in-process sbatch)."""
    monkeypatch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
    monkeypatch.setenv("PATH", slurm_cluster.env["PATH"])
    return slurm_cluster
