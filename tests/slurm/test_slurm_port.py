"""The rendezvous port inside a task: an explicit MASTER_PORT wins over the job-derived one,
and a port another process listens on is a clear error on rank 0 before the process group."""

from __future__ import annotations

import socket

import pytest

from pretrain.slurm import SlurmEnvError, check_port_free, distributed_env_from_slurm

TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_STEP_ID": "0",
    "SLURM_JOB_NODELIST": "n1",
    "SLURM_NTASKS": "2",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "PATH": "/nonexistent",
}


def test_explicit_master_port_wins():
    assert distributed_env_from_slurm(TASK)["MASTER_PORT"] == "14242"
    assert distributed_env_from_slurm({**TASK, "MASTER_PORT": "23456"})["MASTER_PORT"] == "23456"


@pytest.mark.parametrize("bad", ["http", "80", "70000"])
def test_malformed_master_port_is_named(bad):
    with pytest.raises(SlurmEnvError, match=rf"MASTER_PORT='{bad}' must be a port number in 1024..65535"):
        distributed_env_from_slurm({**TASK, "MASTER_PORT": bad})


def test_port_in_use_is_a_clear_error():
    with socket.socket() as holder:
        holder.bind(("", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        with pytest.raises(SlurmEnvError, match=rf"rendezvous port {port} on n1 is already in use .*--master-port"):
            check_port_free(port, "n1")
    check_port_free(port, "n1")  # free again once the other process let go
