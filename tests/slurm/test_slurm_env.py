"""Rank, world size and rendezvous derived from SLURM_* variables (pretrain.slurm)."""

from __future__ import annotations

import pytest

from pretrain.slurm import (
    PORT_BASE,
    PORT_SPAN,
    SlurmEnvError,
    distributed_env_from_slurm,
    first_host,
    first_host_python,
    master_port_for_job,
)


def _task_env(**extra):
    """Variables srun sets in a task (values as seen on the local test cluster)."""
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu[003-006]",
        "SLURM_STEP_NODELIST": "gpu[003-006]",
        "SLURM_NTASKS": "32",
        "SLURM_STEP_NUM_TASKS": "32",
        "SLURM_PROCID": "13",
        "SLURM_LOCALID": "5",
        "PATH": "/nonexistent",  # no scontrol: the pure-Python hostlist parser answers
    }
    env.update(extra)
    return env


def test_four_nodes_eight_tasks_each():
    env = distributed_env_from_slurm(_task_env())
    assert env == {
        "RANK": "13",
        "LOCAL_RANK": "5",
        "WORLD_SIZE": "32",
        "MASTER_ADDR": "gpu003",
        "MASTER_PORT": str(10000 + 4242),
    }


def test_every_rank_agrees_on_the_rendezvous():
    # 2 nodes x 4 tasks, block distribution: procid = node * 4 + localid.
    seen = set()
    for procid in range(8):
        env = distributed_env_from_slurm(
            _task_env(
                SLURM_PROCID=str(procid),
                SLURM_LOCALID=str(procid % 4),
                SLURM_NTASKS="8",
                SLURM_STEP_NUM_TASKS="8",
                SLURM_JOB_NODELIST="n[7,9]",
                SLURM_STEP_NODELIST="n[7,9]",
            )
        )
        assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == (str(procid), str(procid % 4), "8")
        seen.add((env["MASTER_ADDR"], env["MASTER_PORT"]))
    assert seen == {("n7", "14242")}


def test_step_task_count_wins_over_allocation():
    # A step using part of the allocation: SLURM_NTASKS may still describe the job.
    env = distributed_env_from_slurm(_task_env(SLURM_NTASKS="32", SLURM_STEP_NUM_TASKS="16"))
    assert env["WORLD_SIZE"] == "16"
    without_step_count = _task_env(SLURM_NTASKS="32")
    del without_step_count["SLURM_STEP_NUM_TASKS"]
    assert distributed_env_from_slurm(without_step_count)["WORLD_SIZE"] == "32"


def test_outside_slurm_and_in_the_batch_shell_returns_nothing():
    assert distributed_env_from_slurm({}) == {}
    assert distributed_env_from_slurm({"PATH": "/usr/bin", "RANK": "3"}) == {}
    batch_shell = _task_env()
    del batch_shell["SLURM_STEP_ID"]  # the batch script itself is not an srun task
    assert distributed_env_from_slurm(batch_shell) == {}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID='x' is not an integer"),
        ({"SLURM_PROCID": "32"}, "SLURM_PROCID=32 is outside"),
        ({"SLURM_LOCALID": "14"}, "SLURM_LOCALID=14"),
        ({"SLURM_JOB_ID": "abc"}, "SLURM_JOB_ID='abc' is not an integer"),
        ({"SLURM_JOB_NODELIST": "", "SLURM_STEP_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
        ({"SLURM_JOB_NODELIST": "gpu[003-006", "SLURM_STEP_NODELIST": ""}, "not a valid Slurm hostlist"),
    ],
)
def test_bad_variables_are_named(change, message):
    with pytest.raises(SlurmEnvError, match=message.replace("[", r"\[").replace("(", r"\(")):
        distributed_env_from_slurm(_task_env(**change))


def test_missing_localid_is_named():
    env = _task_env()
    del env["SLURM_LOCALID"]
    with pytest.raises(SlurmEnvError, match="SLURM_LOCALID is not set"):
        distributed_env_from_slurm(env)


def test_master_port_range_and_spread():
    ports = [master_port_for_job(j) for j in range(1, 50001)]
    assert min(ports) >= PORT_BASE and max(ports) < PORT_BASE + PORT_SPAN <= 32768
    # Consecutive job ids (often sharing a first node) never share a port within a span.
    assert len(set(ports[:PORT_SPAN])) == PORT_SPAN


NODELISTS = [
    "vm",
    "node[001-004,007],gpu[1-2]",
    "a1,b[3-4]",
    "n[09-11]",
    "pre[1-2]mid[5-6]",
    "gpu[12,3-4]",
    "x-y-[0100-0200]",
]


def test_python_hostlist_parser_matches_known_answers():
    expected = ["vm", "node001", "a1", "n09", "pre1mid5", "gpu12", "x-y-0100"]
    assert [first_host_python(n) for n in NODELISTS] == expected


def test_python_hostlist_parser_matches_scontrol(slurm_env):
    # `scontrol show hostnames` (Slurm's own parser) is the reference.
    for nodelist in NODELISTS:
        reference = slurm_env.cmd(["scontrol", "show", "hostnames", nodelist]).split()[0]
        assert first_host(nodelist) == reference, nodelist
        assert first_host_python(nodelist) == reference, nodelist
