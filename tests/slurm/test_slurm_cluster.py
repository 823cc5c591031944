"""End to end on a real one-node Slurm cluster (tests/slurm/local_cluster.py): submit with
tools/submit.py, 2 CPU tasks (gloo); preemption by `scancel --signal=USR1` -> checkpoint,
requeue, resume, finish.

The protocol test runs a stand-in trainer (fake_trainer.py) through the real template; the
slow tests run the real trainer (`python -m pretrain.train`) on a shrunken tiny config and
compare the preempted run bitwise with an uninterrupted one.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from local_cluster import HELD_DEFAULT_PORTS

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SIGUSR1 = 10


def submit(cluster, run_dir: Path, overrides=(), extra=(), tasks: int = 2) -> str:
    """`tools/submit.py --cpu` with `tasks` tasks; returns the job id."""
    cmd = [
        sys.executable,
        str(REPO_ROOT / "tools" / "submit.py"),
        "--config",
        str(REPO_ROOT / "configs/tiny.yaml"),
        f"train.run_dir={run_dir}",
        *overrides,
        "--cpu",
        "--tasks-per-node",
        str(tasks),
        "--cpus-per-task",
        "1",
        "--time",
        "20",
        "--workdir",
        str(REPO_ROOT),
        *extra,
    ]
    result = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    match = re.search(r"^submitted job (\d+)$", result.stdout, re.M)
    assert match, result.stdout
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in result.stdout
    return match.group(1)


def log_path(run_dir: Path, job_id: str) -> Path:
    return run_dir / "logs" / f"slurm-{job_id}.out"


def read_log(run_dir: Path, job_id: str) -> str:
    path = log_path(run_dir, job_id)
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for_log(cluster, run_dir: Path, job_id: str, pattern: str, timeout: float) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, read_log(run_dir, job_id), re.M)
        if match:
            return match
        state = cluster.job_info(job_id).get("JobState")
        if state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(0.1)
    pytest.fail(
        f"job {job_id} never logged /{pattern}/ ({cluster.job_info(job_id).get('JobState')}):\n"
        f"{read_log(run_dir, job_id)[-4000:]}"
    )


def preempt(cluster, job_id: str, batch: bool = False) -> None:
    """USR1 to the job's tasks (to the batch shell alone with `batch`), then wait until the job
    has requeued itself.

    A requeued job becomes eligible after the credential lifetime (`cred_expire`, 120 s by
    default, 5 s on the test cluster). `scontrol update jobid=<id> StartTime=now` does not
    help: a start before the old credential expires is refused by slurmd ("Job credential
    revoked") and the job ends FAILED."""
    cluster.cmd(["scancel", "--signal=USR1", *(["--batch"] if batch else []), job_id])
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        info = cluster.job_info(job_id)
        if info.get("Restarts") == "1" and info.get("JobState") in ("PENDING", "RUNNING"):
            print(f"job {job_id} requeued: {info.get('JobState')} eligible {info.get('EligibleTime')}")
            return
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.1)
    pytest.fail(f"job {job_id} was not requeued after USR1 ({cluster.job_info(job_id)})")


def wait_completed(cluster, run_dir: Path, job_id: str, timeout: float) -> dict:
    info = cluster.wait_job(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{read_log(run_dir, job_id)[-6000:]}"
    return info


@pytest.mark.slow
def test_preemption_protocol_with_stand_in_trainer(slurm_cluster, tmp_path):
    """Template + pretrain.slurm on real srun tasks: env derivation, USR1 reaching both tasks,
    the same stop step on both ranks, requeue, appended log, resume, code snapshot."""
    run_dir = tmp_path / "fake"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_trainer.py"} "$@"\n')
    wrapper.chmod(0o755)
    job = submit(slurm_cluster, run_dir, ["train.micro_batch=8"], extra=["--python", str(wrapper), "--snapshot-code"])
    wait_for_log(slurm_cluster, run_dir, job, r"^0: rank 0 step 10$", timeout=120)
    preempt(slurm_cluster, job)
    info = wait_completed(slurm_cluster, run_dir, job, timeout=180)
    assert info["Restarts"] == "1"
    log = read_log(run_dir, job)

    host = slurm_cluster.node
    for restart in (0, 1):
        ports = set(re.findall(rf"^\d: rank \d/2 local \d master {host}:(\d+) restart {restart} ", log, re.M))
        assert len(ports) == 1, ports  # one rendezvous port for both ranks
        port = int(ports.pop())
        # The default port is held by this test session: the batch shell took the next free one.
        assert port != 10000 + int(job) % 20000 and port not in HELD_DEFAULT_PORTS
        assert f"job {job} start" in log and f"restart {restart} nodes {host}" in log
        for rank in (0, 1):
            assert f"{rank}: task {rank}/2 local {rank} on {host}" in log
            assert f"{rank}: rank {rank}/2 local {rank} master {host}:{port} restart {restart} allreduce 3" in log
    stops = re.findall(r"^(\d): rank \d stopping at step (\d+) on signal (\d+)$", log, re.M)
    assert len(stops) == 2 and {r for r, _, _ in stops} == {"0", "1"}, stops
    assert len({s for _, s, _ in stops}) == 1, f"ranks stopped at different steps: {stops}"
    stop_step = int(stops[0][1])
    assert 10 <= stop_step < 60
    # USR1 reached both python tasks (not only the batch shell).
    assert {sig for _, _, sig in stops} == {str(SIGUSR1)}
    for rank in (0, 1):
        assert f"{rank}: rank {rank} resumed at step {stop_step}" in log
        assert f"{rank}: rank {rank} finished at step 60" in log
    assert (run_dir / "code" / "pretrain" / "slurm.py").read_text() == (REPO_ROOT / "pretrain/slurm.py").read_text()


def fake_trainer_job(cluster, tmp_path: Path, name: str) -> tuple[Path, str]:
    run_dir = tmp_path / name
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_trainer.py"} "$@"\n')
    wrapper.chmod(0o755)
    return run_dir, submit(cluster, run_dir, ["train.micro_batch=8"], extra=["--python", str(wrapper)])


@pytest.mark.slow
def test_usr1_to_the_batch_shell_requeues(slurm_cluster, tmp_path):
    """`scancel --signal=USR1 --batch` (what --signal=B:USR1 sites send): the batch shell passes
    it on to the tasks, which checkpoint; the job is requeued and resumes (it used to end FAILED)."""
    run_dir, job = fake_trainer_job(slurm_cluster, tmp_path, "batch-usr1")
    wait_for_log(slurm_cluster, run_dir, job, r"^0: rank 0 step 10$", timeout=120)
    preempt(slurm_cluster, job, batch=True)
    info = wait_completed(slurm_cluster, run_dir, job, timeout=180)
    assert info["Restarts"] == "1"
    log = read_log(run_dir, job)
    assert "batch shell: USR1 received, passing it on to the training step" in log
    stops = re.findall(r"^(\d): rank \d stopping at step (\d+) on signal (\d+)$", log, re.M)
    assert sorted(r for r, _, _ in stops) == ["0", "1"] and {sig for _, _, sig in stops} == {str(SIGUSR1)}, stops
    stop_step = stops[0][1]
    for rank in (0, 1):
        assert f"{rank}: rank {rank} resumed at step {stop_step}" in log
        assert f"{rank}: rank {rank} finished at step 60" in log


@pytest.mark.slow
def test_scancel_stops_without_requeue(slurm_cluster, tmp_path):
    """`scancel <job>` (SIGTERM to the tasks) checkpoints and exits; the job stays cancelled."""
    run_dir = tmp_path / "cancelled"
    wrapper = tmp_path / "python-wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {HERE / "fake_trainer.py"} "$@"\n')
    wrapper.chmod(0o755)
    job = submit(slurm_cluster, run_dir, ["train.micro_batch=8"], extra=["--python", str(wrapper)])
    wait_for_log(slurm_cluster, run_dir, job, r"^0: rank 0 step 5$", timeout=120)
    slurm_cluster.cmd(["scancel", job])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "not requeueing" not in read_log(run_dir, job):
        time.sleep(0.1)
    log = read_log(run_dir, job)
    assert f"0: not requeueing Slurm job {job}: stopped by SIGTERM" in log, log[-3000:]
    stops = re.findall(r"^(\d): rank \d stopping at step (\d+) on signal (\d+)$", log, re.M)
    assert sorted(r for r, _, _ in stops) == ["0", "1"] and len({s for _, s, _ in stops}) == 1, stops
    assert (run_dir / "fake_state.json").is_file()  # the checkpoint was written before exiting
    time.sleep(7)  # longer than the test cluster's credential lifetime: a requeued job would be back
    # COMPLETING lasts while slurmd ends the step, which on a loaded machine took longer than those 7 s
    # (a full-suite run beside four others: still COMPLETING); a requeued job leaves it for PENDING
    settled = ("CANCELLED", "PENDING", "REQUEUED", "RUNNING", "COMPLETED", "FAILED", "TIMEOUT", "NODE_FAIL")
    info = slurm_cluster.wait_job(job, settled, timeout=120)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", info


def test_a_job_name_with_spaces_reaches_slurm_whole(slurm_cluster, tmp_path):
    """--job-name with spaces was refused ("has characters Slurm does not accept there"), though
    sbatch reads a quoted #SBATCH value back whole (spaces and '#' inside the quotes kept)."""
    name = "tiny run #2 (lr 3e-4)"
    job = submit(
        slurm_cluster, tmp_path / "run", ["train.micro_batch=8"], extra=["--job-name", name, "--sbatch=--hold"]
    )
    try:
        assert slurm_cluster.cmd(["squeue", "-h", "-j", job, "-o", "%j"]).rstrip("\n") == name
    finally:
        slurm_cluster.cmd(["scancel", job], check=False)


# ---- the real trainer ---------------------------------------------------------------------
MAX_STEPS = 80  # long enough that the signal sent after step 3 lands mid-run on a loaded machine
# configs/tiny.yaml shrunk to ~0.1 s per step on 2 cores: the whole run takes seconds.
SMALL = [
    "model.dim=64",
    "model.n_layers=2",
    "model.memory.layers=[1]",
    "model.memory.n_keys=32",
    "model.memory.heads=2",
    "model.memory.k=8",
    "data.seq_len=32",
    "train.global_batch=4",
    "train.micro_batch=2",
    f"train.max_steps={MAX_STEPS}",
    "train.log_every=1",
    "train.eval_every=1000",
    "train.eval_batches=1",
    "train.probe_limit=8",
    "train.checkpoint_every=1000",
]


@pytest.fixture(scope="module")
def data_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tmp_path_factory, data_cache):
    """An uninterrupted 2-task run of the small config, submitted with tools/submit.py."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    job = submit(slurm_cluster, run_dir, [*SMALL, f"data.cache_dir={data_cache}"])
    info = wait_completed(slurm_cluster, run_dir, job, timeout=600)
    return run_dir, job, info


def final_checkpoint(run_dir: Path) -> Path:
    root = run_dir / "checkpoints"
    tag = (root / "latest").read_text().strip()
    assert tag == f"step_{MAX_STEPS:08d}", tag
    return root / tag


@pytest.mark.slow
def test_submit_two_cpu_tasks_runs_to_completion(reference_run):
    run_dir, job, info = reference_run
    assert info["Restarts"] == "0"
    ckpt = final_checkpoint(run_dir)
    assert (ckpt / "slot_frequencies.safetensors").is_file()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    log = read_log(run_dir, job)
    for rank in (0, 1):
        assert f"{rank}: task {rank}/2 local {rank} on" in log
    assert re.search(rf"^0: .*step {MAX_STEPS}/{MAX_STEPS} loss", log, re.M), log[-3000:]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "train.sbatch").is_file()


def _tensors(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


def _state_tensors(obj, prefix=""):
    """Every tensor in a nested checkpoint dict, by dotted key."""
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_state_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(_state_tensors(v, f"{prefix}.{i}"))
    return out


def assert_bitwise_equal(a: dict, b: dict, what: str) -> None:
    assert sorted(a) == sorted(b), f"{what}: different keys"
    assert a, f"{what}: no tensors"
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, f"{what}: {key}"
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


@pytest.mark.slow
def test_preempted_run_resumes_and_matches_uninterrupted_run(slurm_cluster, reference_run, tmp_path, data_cache):
    ref_dir, _, _ = reference_run
    run_dir = tmp_path / "preempted"
    job = submit(slurm_cluster, run_dir, [*SMALL, f"data.cache_dir={data_cache}"])
    wait_for_log(slurm_cluster, run_dir, job, rf"^0: .*step 3/{MAX_STEPS} loss", timeout=300)
    preempt(slurm_cluster, job)
    info = wait_completed(slurm_cluster, run_dir, job, timeout=600)
    assert info["Restarts"] == "1"
    log = read_log(run_dir, job)
    stop = re.search(r"stopping at step (\d+) \(signal\)", log)
    assert stop, log[-4000:]
    stop_step = int(stop.group(1))
    assert 3 <= stop_step < MAX_STEPS, f"the signal must land mid-run (stopped at {stop_step})"
    assert re.search(rf"resumed from \S+step_{stop_step:08d} at step {stop_step}", log), log[-4000:]

    ours, ref = final_checkpoint(run_dir), final_checkpoint(ref_dir)
    at_stop = run_dir / "checkpoints" / f"step_{stop_step:08d}" / "slot_frequencies.safetensors"
    assert _tensors(at_stop)[1]["run_id"] == _tensors(ours / "slot_frequencies.safetensors")[1]["run_id"]
    names = sorted(p.name for p in ref.iterdir())
    assert names == sorted(p.name for p in ours.iterdir())
    for name in names:
        if name.endswith(".safetensors"):
            (ta, ma), (tb, mb) = _tensors(ours / name), _tensors(ref / name)
            assert_bitwise_equal(ta, tb, name)
            if name == "slot_frequencies.safetensors":  # each run has its own id (kept across the requeue)
                assert ma.pop("run_id") != mb.pop("run_id")
            assert ma == mb, f"{name}: metadata differs"
        elif name.endswith("model_states.pt"):
            a = torch.load(ours / name, weights_only=True, map_location="cpu")
            b = torch.load(ref / name, weights_only=True, map_location="cpu")
            assert_bitwise_equal(_state_tensors(a["module"]), _state_tensors(b["module"]), f"{name} parameters")
            assert_bitwise_equal(_state_tensors(a), _state_tensors(b), f"{name} (all tensors)")
        elif name.startswith("rank_") and name.endswith(".pt"):
            # Per-rank data position, RNG states and slot counters: the resume was exact on every rank.
            a = torch.load(ours / name, weights_only=True)
            b = torch.load(ref / name, weights_only=True)
            assert_bitwise_equal(_state_tensors(a), _state_tensors(b), name)


def _catches_usr1(pid: str) -> bool:
    """Whether process `pid` has a handler installed for SIGUSR1 (/proc's SigCgt mask)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(re.search(r"^SigCgt:\s*([0-9a-f]+)", status, re.M).group(1), 16)
    return bool(mask >> (SIGUSR1 - 1) & 1)


def _trainer_pids(job: str) -> list[str]:
    """Process ids of the job's `python -m pretrain.train` tasks (the cluster is this machine)."""
    out = subprocess.run(["pgrep", "-f", "pretrain.train --config"], capture_output=True, text=True).stdout
    pids = []
    for pid in out.split():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        is_python = argv[1:3] == [b"-m", b"pretrain.train"]  # not srun, nor the bash before its exec
        if is_python and f"SLURM_JOB_ID={job}".encode() in environ and b"SLURM_STEP_ID=0" in environ:
            pids.append(pid)
    return pids


@pytest.mark.slow
def test_usr1_during_start_up_requeues_and_resumes(slurm_cluster, tmp_path, data_cache):
    """USR1 while the trainer's tasks are still importing torch (before any step): both tasks
    survive it, checkpoint after their first step, the job is requeued and resumes from that
    checkpoint (it used to end FAILED: the signal killed the tasks)."""
    run_dir = tmp_path / "startup"
    job = submit(slurm_cluster, run_dir, [*SMALL, "train.max_steps=4", f"data.cache_dir={data_cache}"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        pids = _trainer_pids(job)
        if len(pids) == 2 and all(_catches_usr1(pid) for pid in pids):
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the trainer tasks of job {job} never installed a USR1 handler:\n{read_log(run_dir, job)[-3000:]}")
    assert "step 1/" not in read_log(run_dir, job)  # still starting up
    slurm_cluster.cmd(["scancel", "--signal=USR1", job])
    preempt_deadline = time.monotonic() + 180
    while time.monotonic() < preempt_deadline:
        info = slurm_cluster.job_info(job)
        if info.get("Restarts") == "1" or info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.1)
    info = wait_completed(slurm_cluster, run_dir, job, timeout=600)
    assert info["Restarts"] == "1"
    log = read_log(run_dir, job)
    assert re.search(r"stopping at step 1 \(signal\)", log), log[-4000:]
    assert re.search(r"resumed from \S+step_00000001 at step 1", log), log[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


@pytest.mark.slow
def test_run_resubmitted_on_fewer_tasks_resumes_and_finishes(slurm_cluster, tmp_path, data_cache):
    """A 2-task ZeRO-1 run stopped by `scancel` (checkpoint, no requeue) and resubmitted with
    `--resume` on 1 task: the trainer re-partitions the checkpoint and finishes, with every
    token counted once in the slot table."""
    from pretrain.slots import load_table

    run_dir = tmp_path / "shrunk"
    overrides = [*SMALL, f"data.cache_dir={data_cache}", "train.zero_stage=1"]
    first = submit(slurm_cluster, run_dir, overrides)
    wait_for_log(slurm_cluster, run_dir, first, rf"^0: .*step 3/{MAX_STEPS} loss", timeout=300)
    slurm_cluster.cmd(["scancel", first])
    stop = wait_for_log(slurm_cluster, run_dir, first, r"^0: .*stopping at step (\d+) \(signal\)", timeout=120)
    slurm_cluster.wait_job(first, ("CANCELLED", "COMPLETED", "FAILED"), 60)
    deadline = time.monotonic() + 60  # --resume is refused while squeue lists the job (also COMPLETING)
    while first in slurm_cluster.cmd(["squeue", "--noheader", "--format=%i"]).split() and time.monotonic() < deadline:
        time.sleep(0.2)
    second = submit(slurm_cluster, run_dir, overrides, extra=["--resume"], tasks=1)
    wait_completed(slurm_cluster, run_dir, second, timeout=600)
    log = read_log(run_dir, second)
    n = int(stop.group(1))
    assert re.search(rf"resumed from \S+step_{n:08d} at step {n}", log), log[-4000:]
    assert "re-partitioned from 2 ranks to 1: dense state DeepSpeed universal checkpoint" in log, log[-4000:]
    table = load_table(final_checkpoint(run_dir))
    opts = dict(o.split("=", 1) for o in SMALL)
    assert table.num_tokens == MAX_STEPS * int(opts["train.global_batch"]) * int(opts["data.seq_len"])


def _trainer_pid(job: str, rank: int) -> int:
    for pid in _trainer_pids(job):
        if f"SLURM_PROCID={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            return int(pid)
    pytest.fail(f"no trainer task of rank {rank} in job {job}")


@pytest.mark.slow
def test_stopped_rank_is_reported_and_the_job_requeued(slurm_cluster, tmp_path, data_cache):
    """Rank 1 stopped mid-run (SIGSTOP: a frozen node; rank 0 then waits in a collective that
    never completes): after train.hang_timeout_s rank 0 reports where it waits, names rank 1 as
    the rank without a report, and requeues the job, which resumes from the last checkpoint
    and finishes."""
    run_dir = tmp_path / "hung"
    overrides = [*SMALL, f"data.cache_dir={data_cache}", "train.checkpoint_every=2", "train.hang_timeout_s=8"]
    job = submit(slurm_cluster, run_dir, overrides)
    wait_for_log(slurm_cluster, run_dir, job, rf"^0: .*step 5/{MAX_STEPS} loss", timeout=300)
    os.kill(_trainer_pid(job, 1), signal.SIGSTOP)
    info = wait_completed(slurm_cluster, run_dir, job, timeout=600)
    assert info["Restarts"] == "1"
    log = read_log(run_dir, job)
    assert re.search(
        r"^0: rank 0: no progress for 8 s after [^;]*step \d+; .*main thread at .*called from pretrain/", log, re.M
    ), log[-4000:]
    assert re.search(
        r"^1: rank 1: no progress for 8 s after [^;]*step \d+; process T \(stopped\); main thread at \?", log, re.M
    )
    assert "0: hang: no rank progressed for 8 s (train.hang_timeout_s). Look first at rank 1 (T (stopped)" in log
    requeue = re.search(r"^0: requeued: the job restarts from checkpoint (step_\d+)$", log, re.M)
    assert requeue, log[-4000:]
    step = int(requeue.group(1).removeprefix("step_"))
    assert step >= 4
    assert re.search(rf"resumed from \S+{requeue.group(1)} at step {step}", log), log[-4000:]
    (summary,) = (run_dir / "hangs").glob("*/summary.txt")
    assert "Look first at rank 1 (T (stopped), did not answer)" in summary.read_text()
    report = (summary.parent / "rank00000.txt").read_text()
    assert re.search(r"^where: .*, called from pretrain/", report, re.M), report[:2000]
    assert "answered the stack dump: no" in (summary.parent / "rank00001.txt").read_text()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{MAX_STEPS:08d}"
