"""Process start-up: rank/world from torchrun, the deepspeed launcher, SLURM or nothing.

`init_distributed()` always leaves torch.distributed initialised (world 1 included,
because DeepSpeed's engine needs a process group) and returns where this rank runs.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def default_deepspeed_accelerator() -> str:
    """Set DS_ACCELERATOR, when unset, to the accelerator this process has: cuda where a GPU is
    visible, else cpu (which also silences DeepSpeed's CPU-fallback warning). Call it before
    DeepSpeed is imported; a tool that pinned cpu unconditionally ran its GPU trainings with a
    CPU DeepSpeed accelerator, whose first collective on a CUDA tensor then failed."""
    if not os.environ.get("DS_ACCELERATOR"):
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
    return os.environ["DS_ACCELERATOR"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fill_environment() -> None:
    """Set RANK/WORLD_SIZE/... from SLURM when a launcher did not; defaults for one process."""
    if "RANK" not in os.environ:
        from pretrain.slurm import distributed_env_from_slurm

        slurm_env = distributed_env_from_slurm(os.environ)
        for key, value in slurm_env.items():
            os.environ.setdefault(key, str(value))
        if slurm_env.get("RANK") == "0" and slurm_env["WORLD_SIZE"] != "1":
            from pretrain.slurm import check_port_free

            check_port_free(int(os.environ["MASTER_PORT"]), os.environ["MASTER_ADDR"])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"] if os.environ["WORLD_SIZE"] == "1" else "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise RuntimeError("MASTER_PORT is not set for a multi-process run: launch with torchrun or srun")
        os.environ["MASTER_PORT"] = str(free_port())


def launched_world_size() -> int:
    """The number of processes this one was launched among (torchrun, the deepspeed launcher,
    SLURM; 1 without a launcher), known before the process group exists."""
    _fill_environment()
    return int(os.environ["WORLD_SIZE"])


# How long the ranks wait for each other at the rendezvous by default (DeepSpeed's default, which
# the trainer used before collectives got their own timeout; train.rendezvous_timeout_s sets it): a
# rank stuck before it reaches the trainer (importing torch from a hung filesystem) fails the start
# after this, not after the longer collective timeout. Nodes of a multi-node job may start a minute
# or more apart.
RENDEZVOUS_TIMEOUT_S = 600.0
_ARRIVED = "memlayers/arrived/"  # a rank's key in the rendezvous store: its host
_PROCESS = "memlayers/pid/"  # and its process id, set before it
_store = None  # this process's client of the rendezvous store (rank 0's process serves it)
_SERVER_GRACE_S = 10.0  # how much longer rank 0, whose process serves the store, waits than the others


class RendezvousTimeout(RuntimeError):
    """The rendezvous failed: some rank never reached it (the message names the ranks missing and
    the fix), or rank 0, which serves it, ended before every rank arrived."""


def _rendezvous_store(rank: int, world_size: int, timeout_s: float):
    """The TCPStore every rank meets at (rank 0 serves it); a rank that cannot reach rank 0's
    within `timeout_s` is refused, naming the address and what to look at."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # under torchrun the store at MASTER_PORT is its agent's (node 0's torchrun serves it): rank 0's own
    # server failed to bind there and torch printed '[E ...] The server socket on <port> has failed to bind'
    agents = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(
            addr,
            port,
            world_size,
            is_master=rank == 0 and not agents,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
        )
    except (RuntimeError, OSError) as err:  # DistNetworkError / DistStoreError: rank 0 is not listening there
        if rank == 0:
            raise
        raise RendezvousTimeout(
            f"rank {rank} on {socket.gethostname()} could not reach the rendezvous at {addr}:{port} (rank 0's) "
            f"within {timeout_s:.0f} s (train.rendezvous_timeout_s): rank 0 never started or failed before it "
            "(look at its output first), or listens elsewhere (MASTER_ADDR, MASTER_PORT)"
        ) from err
    return dist.PrefixStore(_attempt_prefix(world_size), store) if agents else store


def _attempt_prefix(world_size: int) -> str:
    """The keys of this start in torchrun's agent store, which outlives its workers: a group restarted
    by `torchrun --max-restarts` met the keys its previous start left there (every rank's arrival, at
    once; gloo's addresses of the dead processes, `Connection refused` on every rank), and failed every
    restart. torchrun numbers its restarts; the world size tells apart an elastic re-rendezvous that
    added nodes without a restart."""
    return f"memlayers/attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}-world-{world_size}/"


def wait_for_every_rank(store, rank: int, world_size: int, timeout_s: float) -> None:
    """Announce this rank in `store` and wait up to `timeout_s` for every other rank to; at the
    timeout raise RendezvousTimeout on each rank that came, naming the ranks missing (torch's own
    store said only 'Timed out after 601 seconds waiting for clients. 1/2 clients joined')."""
    store.set(f"{_PROCESS}{rank}", f"{os.getpid()} {pid_namespace()}")
    store.set(f"{_ARRIVED}{rank}", socket.gethostname())
    keys = [f"{_ARRIVED}{r}" for r in range(world_size)]
    started = time.monotonic()
    try:
        # rank 0 serves the store: it gives up last, so that the others can still read who came
        store.wait(keys, timedelta(seconds=timeout_s + (_SERVER_GRACE_S if rank == 0 else 0)))
        return
    except dist.DistNetworkError:  # not a timeout: rank 0's process, which serves the store, is gone
        raise RendezvousTimeout(
            f"rank {rank} lost the rendezvous after {time.monotonic() - started:.0f} s, before every rank "
            "arrived: rank 0, whose process serves it, ended (it failed or was killed: look at its output first)"
        ) from None
    except RuntimeError:  # DistStoreError: the wait timed out
        pass
    waited = f"rank {rank} waited {timeout_s + (_SERVER_GRACE_S if rank == 0 else 0):.0f} s at the rendezvous"
    fix = (
        "a rank that never starts failed before the trainer (an import error, a missing environment, its "
        f"node: look at that task's output). To give up sooner than train.rendezvous_timeout_s={timeout_s:g}, "
        "lower it, keeping it above the time the job's nodes take to start, which can be a minute or more apart"
    )
    try:
        missing = [r for r, key in enumerate(keys) if not store.check([key])]
        hosts = sorted({store.get(key).decode() for r, key in enumerate(keys) if r not in missing})
    except RuntimeError:  # rank 0 gave up first and its store is gone: its message names them
        raise RendezvousTimeout(
            f"{waited} for the other ranks, and rank 0 gave up too (its output names the ranks missing): {fix}"
        ) from None
    raise RendezvousTimeout(
        f"{waited} for {describe_ranks(missing)} of {world_size}, which never arrived ({world_size - len(missing)} did, "
        f"on {', '.join(hosts)}): {fix}"
    )


def pid_namespace() -> str:
    """This process's PID namespace ('pid:[4026531836]'; '' without /proc): process ids compare within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def rank_processes(timeout_s: float = 10.0) -> list[tuple[str, int | None]] | None:
    """(host, process id) of every rank, as each announced itself at the rendezvous; the id None where
    that rank's process is in another PID namespace than this one (a container of its own on the same
    host): there the id names no process, or another. [] where the store does not answer within
    `timeout_s` (rank 0's process, which serves it, has ended); None where this process did not make
    it (a process group made by the caller)."""
    if _store is None:
        return None
    world_size = dist.get_world_size()
    waits = _store.timeout  # the process group's, restored: it reads the store while making groups
    try:
        _store.set_timeout(timedelta(seconds=timeout_s))
        hosts = _store.multi_get([f"{_ARRIVED}{r}" for r in range(world_size)])
        pids = _store.multi_get([f"{_PROCESS}{r}" for r in range(world_size)])
    except (RuntimeError, OSError):  # DistNetworkError, DistStoreError
        return []
    finally:
        _store.set_timeout(waits)
    here = pid_namespace()
    processes = []
    for host, announced in zip(hosts, pids):
        pid, _, namespace = announced.decode().partition(" ")
        processes.append((host.decode(), int(pid) if namespace == here else None))
    return processes


def describe_ranks(ranks: list[int]) -> str:
    """'rank 3', or 'ranks 1, 3, ...' (at most 8 shown)."""
    shown = ", ".join(map(str, ranks[:8])) + (", ..." if len(ranks) > 8 else "")
    return f"rank {shown}" if len(ranks) == 1 else f"ranks {shown}"


_pointed_local_rank: tuple[str, int] | None = None  # (LOCAL_RANK as init_distributed set it, as launched)


def node_local_rank() -> int:
    """This task's rank on its node: LOCAL_RANK as the launcher set it (`init_distributed` sets it
    to the task's GPU index for DeepSpeed where the two differ)."""
    value = os.environ["LOCAL_RANK"]
    if _pointed_local_rank is not None and _pointed_local_rank[0] == value:
        return _pointed_local_rank[1]
    return int(value)


def cuda_device_index(local_rank: int, device_count: int) -> int:
    """The GPU this task uses among the `device_count` it sees: 0 where it sees one (a site that
    binds one GPU per task: srun --gpus-per-task=1 or --gpu-bind, CUDA_VISIBLE_DEVICES holding one
    device, numbered 0 in the task), else its rank on the node (every task sees the node's GPUs).
    A task whose rank on the node has no GPU is refused, naming the numbers and the fix: CUDA's
    own 'invalid device ordinal' named none of them."""
    if device_count == 1:
        return 0
    if local_rank < device_count:
        return local_rank
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise RuntimeError(
        f"LOCAL_RANK={local_rank} (this task's rank on its node) but the task sees {device_count} GPUs "
        f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else '<unset>'}): there is no GPU {local_rank}. "
        "Start at most one task per GPU on each node (--ntasks-per-node no more than its GPUs, as "
        "slurm/train_gpu.sbatch does), each seeing all the node's GPUs or exactly one (--gpus-per-task=1)"
    )


def init_distributed(timeout_s: float | None = None, rendezvous_timeout_s: float | None = None) -> DistInfo:
    """Initialise torch.distributed (NCCL on GPUs, gloo on CPU) and DeepSpeed's communication on it.

    `timeout_s`: how long a collective may wait before it fails (DeepSpeed's default, 600 s,
    when None); with it, the ranks wait `rendezvous_timeout_s` (RENDEZVOUS_TIMEOUT_S when None)
    for each other at the start, then a RendezvousTimeout names the ranks missing. Ignored when a
    process group exists already."""
    global _pointed_local_rank, _store
    import deepspeed

    from kernels.deepspeed_ops import share_deepspeed_op_builds

    share_deepspeed_op_builds()  # its CPU comm op: one build for every checkout, not one per switch
    _fill_environment()
    local_rank = node_local_rank()
    if torch.cuda.is_available():
        index = cuda_device_index(local_rank, torch.cuda.device_count())
        if index != local_rank:
            # DeepSpeed takes LOCAL_RANK for the device index (its engine, ZeRO-3's partitions, the
            # NCCL group's device): where the task sees one GPU it must read 0
            os.environ["LOCAL_RANK"], _pointed_local_rank = str(index), (str(index), local_rank)
        torch.cuda.set_device(index)
        device, backend = torch.device("cuda", index), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if timeout_s is not None:
            rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            rendezvous_s = RENDEZVOUS_TIMEOUT_S if rendezvous_timeout_s is None else rendezvous_timeout_s
            store = _rendezvous_store(rank, world_size, rendezvous_s)
            wait_for_every_rank(store, rank, world_size, rendezvous_s)
            # the store outlives the rendezvous: the process group reads it with the store's own timeout
            # (NCCL's id exchange at each group's first collective, which a rank busy at start-up reaches
            # late), so from here it waits as long as a collective, as torch sets a store it makes itself
            store.set_timeout(timedelta(seconds=timeout_s))
            _store = store
            dist.init_process_group(
                backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
            )
        deepspeed.init_distributed(dist_backend=backend)  # on the group above, if made
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    """Wait for every rank; nothing to wait for without a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _all_reduced(value: int, op) -> int:
    """`value` reduced over ranks with `op` (an all-reduce; `value` itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = _collective_tensor([value], torch.int64)
    dist.all_reduce(tensor, op=op)
    return int(tensor.item())


def global_sum(value: int) -> int:
    """The sum of `value` over ranks (`value` itself without a process group)."""
    return _all_reduced(value, dist.ReduceOp.SUM)


def global_max(value: int) -> int:
    """The largest `value` over ranks (`value` itself without a process group)."""
    return _all_reduced(value, dist.ReduceOp.MAX)


def global_min(value: int) -> int:
    """The least `value` over ranks (`value` itself without a process group)."""
    return _all_reduced(value, dist.ReduceOp.MIN)


def global_sums(values: list[int]) -> list[int]:
    """The element-wise sum of `values` (the same length on every rank) over ranks (an all-reduce)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return list(values)
    tensor = _collective_tensor(values, torch.int64)
    dist.all_reduce(tensor)
    return [int(v) for v in tensor.tolist()]


def rank0_text(text: str) -> str:
    """Rank 0's `text` on every rank (`text_from`)."""
    return text_from(0, text)


def text_from(src: int, text: str) -> str:
    """Rank `src`'s `text` on every rank: torch's broadcast_object_list (two broadcasts, its pickled
    size, then the bytes; the ranks of one job trust each other's pickles, as all_gather_object does)."""
    if not (dist.is_available() and dist.is_initialized()):
        return text
    box = [text]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def rank0_value(value: int) -> int:
    """Rank 0's `value` on every rank (a broadcast; `value` itself without a process group)."""
    return _broadcast_value(value, 0)


def _broadcast_value(value: int, src: int) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    tensor = _collective_tensor([value], torch.int64)
    dist.broadcast(tensor, src=src)
    return int(tensor.item())


@dataclass(frozen=True)
class RankProblem:
    """What `first_problem` agreed on: the ranks that have a problem and the lowest one's message."""

    ranks: tuple[int, ...]
    world_size: int
    message: str

    @property
    def rank(self) -> int:
        return self.ranks[0]

    def who(self) -> str:
        """'rank 3', or 'ranks 1, 3 (2 of 8)'."""
        count = f" ({len(self.ranks)} of {self.world_size})" if len(self.ranks) > 1 else ""
        return describe_ranks(list(self.ranks)) + count


def first_problem(problem: str | None) -> RankProblem | None:
    """Every rank's `problem` (a message; None: none) agreed on: the ranks that have one and the
    lowest such rank's message, the same on every rank; None on every rank where none has one.

    A collective (an all-reduce, then the message's broadcast where there is one) that every rank
    reaches at the same point: a problem found on one rank alone (a file only it reads, its
    node's filesystem) stops them all, named, instead of leaving the others waiting in their next
    collective for a rank that has left."""
    if not (dist.is_available() and dist.is_initialized()):
        return None if problem is None else RankProblem((0,), 1, problem)
    world = dist.get_world_size()
    flags = [0] * world
    flags[dist.get_rank()] = int(problem is not None)
    ranks = tuple(r for r, flag in enumerate(global_sums(flags)) if flag)
    if not ranks:
        return None
    return RankProblem(ranks, world, text_from(ranks[0], problem or ""))


@contextmanager
def refusal_shared(*kinds: type[Exception]):
    """Run the block on every rank, then agree (a collective, also where nothing was raised): an
    error of `kinds` raised in it on some ranks is raised on every rank, the failing rank's own as
    it was, on the others the same kind naming that rank, its host and its message. For the checks
    that can differ between ranks (a node-local path, a file only one rank reads): raised on one
    rank alone, such a refusal left the others waiting in their next collective.

    The block must hold no collective: a rank that raised in it would not reach that one."""
    refusal = None
    try:
        yield
    except kinds as err:
        refusal = err
    share_refusal(refusal, kinds)


def share_refusal(refusal: Exception | None, kinds: tuple[type[Exception], ...]) -> None:
    """`refusal_shared`'s agreement: call it on every rank at the same point, with this rank's
    refusal (an instance of one of `kinds`) or None."""
    note = None
    if refusal is not None:
        kind = next(i for i, k in enumerate(kinds) if isinstance(refusal, k))
        note = f"{kind}\n{socket.gethostname()}\n{refusal}"
    agreed = first_problem(note)
    if agreed is None:
        return
    if refusal is None:
        kind, host, message = agreed.message.split("\n", 2)
        where = f"rank {agreed.rank} on {host}"
        who = where if len(agreed.ranks) == 1 else f"{agreed.who()}, first {where}"
        refusal = kinds[int(kind)](f"{who}: {message}")
    refusal._shared_on_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    raise refusal


def reports_refusal(err: BaseException) -> bool:
    """Whether this process prints `err`: yes, unless `share_refusal` raised it on every rank and this
    is not rank 0 (which prints it for all: N ranks printed N lines)."""
    return getattr(err, "_shared_on_rank", 0) == 0


def gather_floats(value: float) -> list[float]:
    """Every rank's `value`, in rank order (an all-gather; [value] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    tensor = _collective_tensor([value], torch.float64)
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return [float(t.item()) for t in gathered]


def _collective_tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
    """`values` as a tensor on the device the process group communicates from (NCCL: the GPU)."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.cuda() if dist.get_backend() == "nccl" else tensor
