"""`init_distributed(timeout_s)` on real processes: a collective waits `timeout_s` (the trainer
makes it longer than the hang watchdog's allowances), while the rendezvous still gives up after
RENDEZVOUS_TIMEOUT_S when a rank never arrives."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pretrain.distributed import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def launch(rank: int, world_size: int, port: int, body: str, **extra_env: str) -> subprocess.Popen:
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO_ROOT)!r})
        import torch, torch.distributed as dist
        import pretrain.distributed as d
        """
    ) + textwrap.dedent(body)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        **extra_env,
    }
    return subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)


def all_reduce_after(delay_rank1: float, timeout_s: float, port: int) -> list[subprocess.Popen]:
    """Start two ranks on `port`; rank 1 reaches the all-reduce `delay_rank1` s late."""
    body = f"""
    d.init_distributed(timeout_s={timeout_s})
    if dist.get_rank() == 1:
        time.sleep({delay_rank1})
    x = torch.ones(1)
    dist.all_reduce(x)
    assert x.item() == 2
    dist.destroy_process_group()
    """
    return [launch(r, 2, port, body) for r in range(2)]


def outcome(ranks: list[subprocess.Popen]) -> list[tuple[int, str]]:
    """(returncode, stderr) per rank."""
    return [(p.wait(timeout=120), p.stderr.read()) for p in ranks]


def test_collectives_wait_the_given_timeout():
    ports = {free_port()}
    while len(ports) < 2:
        ports.add(free_port())
    # both pairs at once, on two ports: each mostly waits out its 6 s delay
    short, long = (all_reduce_after(6, timeout_s, port) for timeout_s, port in zip((2, 60), sorted(ports)))
    (rc0, err0), _ = outcome(short)
    assert rc0 != 0 and "timed out" in err0.lower(), err0[-2000:]
    results = outcome(long)
    assert [rc for rc, _ in results] == [0, 0], results


def test_rendezvous_gives_up_without_waiting_the_collective_timeout():
    body = """
    d.RENDEZVOUS_TIMEOUT_S = 2
    start = time.monotonic()
    try:
        d.init_distributed(timeout_s=300)
    except Exception as err:
        print(f"refused after {time.monotonic() - start:.1f} s: {type(err).__name__}", file=sys.stderr)
        sys.exit(3)
    """
    start = time.monotonic()
    alone = launch(0, 2, free_port(), body)  # rank 1 never starts
    rc, err = alone.wait(timeout=120), alone.stderr.read()
    assert rc == 3, err[-2000:]
    assert time.monotonic() - start < 60, err[-2000:]


@pytest.mark.parametrize("cuda, expected", [(True, "cuda"), (False, "cpu")])
def test_deepspeed_accelerator_follows_the_device_when_unset(monkeypatch, cuda, expected):
    """Tools that train (bench_train, compare_dense) pick DeepSpeed's accelerator from the
    device: pinning cpu on a GPU machine made DeepSpeed's first broadcast fail (H200, abf31f5)."""
    from pretrain.distributed import default_deepspeed_accelerator

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    assert default_deepspeed_accelerator() == expected == os.environ["DS_ACCELERATOR"]
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert default_deepspeed_accelerator() == "cpu"  # a user's choice is kept


def _rendezvous_only(timeout_s: float) -> str:
    return f"""
    try:
        d.init_distributed(timeout_s=300, rendezvous_timeout_s={timeout_s})
    except d.RendezvousTimeout as err:
        print(f"refused: {{err}}", file=sys.stderr)
        sys.exit(3)
    x = torch.ones(1)
    dist.all_reduce(x)
    print(f"sum {{x.item():.0f}}", file=sys.stderr)
    dist.destroy_process_group()
    """


def _refusal(stderr: str) -> str:
    return next((line for line in stderr.splitlines() if line.startswith("refused: ")), stderr[-2000:])


def test_a_rank_that_never_arrives_is_named_on_every_rank_that_did():
    """torch's store said only 'Timed out after 601 seconds waiting for clients. 1/2 clients joined'
    (rank 0), and a rank that had arrived waited on in the process group's own connection."""
    import socket

    port = free_port()
    came = [launch(rank, 3, port, _rendezvous_only(3)) for rank in (0, 2)]  # rank 1 never starts
    for rank, (rc, err) in zip((0, 2), outcome(came)):
        assert rc == 3, err[-2000:]
        waited = 13 if rank == 0 else 3  # rank 0 serves the store: it gives up last
        assert _refusal(err) == (
            f"refused: rank {rank} waited {waited} s at the rendezvous for rank 1 of 3, which never arrived (2 did, "
            f"on {socket.gethostname()}): a rank that never starts failed before the trainer (an import error, a "
            "missing environment, its node: look at that task's output). To give up sooner than "
            "train.rendezvous_timeout_s=3, lower it, keeping it above the time the job's nodes take to start, "
            "which can be a minute or more apart"
        )


def test_a_rank_without_rank_0_names_the_address_it_could_not_reach():
    port = free_port()
    ((rc, err),) = outcome([launch(1, 2, port, _rendezvous_only(2))])
    assert rc == 3, err[-2000:]
    assert _refusal(err).startswith(
        f"refused: rank 1 on {__import__('socket').gethostname()} could not reach the rendezvous at 127.0.0.1:{port} "
        "(rank 0's) within 2 s (train.rendezvous_timeout_s): rank 0 never started"
    )


def test_a_rank_whose_rendezvous_server_ends_says_so_at_once():
    """Rank 0, whose process serves the rendezvous store, ending before every rank arrived (a crash, a
    kill) made a waiting rank say at once that it had `waited 60 s ... and rank 0 gave up too` (seen
    after 6 s in the Slurm test); it now says how long it waited and that rank 0 ended."""
    port = free_port()
    server = launch(0, 3, port, "store = d._rendezvous_store(0, 3, 60)\ntime.sleep(3)\nimport os\nos._exit(5)\n")
    time.sleep(1)
    ((rc, err),) = outcome([launch(1, 3, port, _rendezvous_only(60))])  # rank 2 never starts
    assert server.wait(timeout=60) == 5
    assert rc == 3, err[-2000:]
    refusal = _refusal(err)
    assert refusal.startswith("refused: rank 1 lost the rendezvous after "), refusal
    waited = int(refusal.removeprefix("refused: rank 1 lost the rendezvous after ").split(" s")[0])
    assert waited < 60  # it did not wait for the timeout it would have named
    assert refusal.endswith(
        " s, before every rank arrived: rank 0, whose process serves it, ended (it failed or was killed: look at "
        "its output first)"
    )


def test_under_torchrun_rank_0_meets_the_others_at_the_agents_store():
    """torchrun's agent (node 0's torchrun) serves the store at MASTER_PORT and says so to its workers
    (TORCHELASTIC_USE_AGENT_STORE=True). Rank 0 tried to serve one there too: every torchrun start, one
    node or several, printed torch's '[E ...] The server socket on <port> has failed to bind.
    TORCHELASTIC_USE_AGENT_STORE is enabled so ignoring the error.' Here a plain process stands in for
    the agent."""
    port = free_port()
    agent = launch(0, 1, port, "store = dist.TCPStore('127.0.0.1', int(__import__('os').environ['MASTER_PORT']), is_master=True)\n"
                   "print('serving', file=sys.stderr, flush=True)\ntime.sleep(120)\n")  # fmt: skip
    try:
        assert agent.stderr.readline() == "serving\n"
        ranks = [launch(r, 2, port, _rendezvous_only(60), TORCHELASTIC_USE_AGENT_STORE="True") for r in range(2)]
        for rc, err in outcome(ranks):
            assert rc == 0 and "sum 2" in err, err[-2000:]
            assert "failed to bind" not in err, err[-2000:]
    finally:
        agent.kill()


def test_a_group_torchrun_restarts_meets_afresh_at_the_agents_store():
    """`torchrun --max-restarts=N` restarts every rank after one failed, and its agent's store outlives them:
    the restarted ranks met the keys of the attempt before (each rank's arrival, read at once; gloo's
    addresses of the dead processes: `Connection refused` on every rank, the run failed every restart).
    Each attempt (TORCHELASTIC_RESTART_COUNT) now meets under keys of its own. A plain process stands in for
    the agent, as above."""
    port = free_port()
    agent = launch(0, 1, port, "store = dist.TCPStore('127.0.0.1', int(__import__('os').environ['MASTER_PORT']), is_master=True)\n"
                   "print('serving', file=sys.stderr, flush=True)\ntime.sleep(120)\n")  # fmt: skip

    def attempt(count: int, ranks=(0, 1), timeout_s: float = 60):
        env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": str(count)}
        return outcome([launch(r, 2, port, _rendezvous_only(timeout_s), **env) for r in ranks])

    try:
        assert agent.stderr.readline() == "serving\n"
        for rc, err in attempt(0):
            assert rc == 0 and "sum 2" in err, err[-2000:]
        # rank 0 of the restart late: rank 1 waits for it, where the first attempt's key said it had come
        ((rc, err),) = attempt(1, ranks=(1,), timeout_s=2)
        assert rc == 3, err[-2000:]
        assert _refusal(err).startswith("refused: rank 1 waited 2 s at the rendezvous for rank 0 of 2, which never"), (
            err
        )
        for rc, err in attempt(1):
            assert rc == 0 and "sum 2" in err, err[-2000:]
    finally:
        agent.kill()


def test_ranks_that_start_apart_within_the_timeout_still_meet():
    """Nodes of a multi-node job start up to a minute or more apart: a late rank joins."""
    port = free_port()
    first = launch(0, 2, port, _rendezvous_only(60))
    time.sleep(5)
    late = launch(1, 2, port, _rendezvous_only(60))
    for rc, err in outcome([first, late]):
        assert rc == 0 and "sum 2" in err, err[-2000:]


@pytest.mark.parametrize("value", ["0", "-5", ".nan"])
def test_a_rendezvous_timeout_that_is_not_positive_is_refused_at_load(value):
    from pretrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.rendezvous_timeout_s=\S+ must be > 0"):
        load_config("configs/tiny.yaml", [f"train.rendezvous_timeout_s={value}"])


def test_after_the_rendezvous_the_store_waits_as_long_as_a_collective():
    """The rendezvous store is the process group's store: NCCL's communicator-id exchange, at a group's
    first collective, waits on it with the store's own timeout. That stayed the rendezvous timeout, so
    train.rendezvous_timeout_s=60 would end a start where one rank reached its first collective a minute
    after the others (a conversion at start-up), though collectives wait train's longer timeout. The
    reference: the default store's timeout after init_distributed, as torch sets a store it makes."""
    body = """
    d.init_distributed(timeout_s=300, rendezvous_timeout_s=3)
    print(f"store timeout {dist.distributed_c10d._get_default_store().timeout.total_seconds():.0f}", file=sys.stderr)
    dist.destroy_process_group()
    """
    ((rc, err),) = outcome([launch(0, 1, free_port(), body)])
    assert rc == 0 and "store timeout 300" in err, err[-2000:]
