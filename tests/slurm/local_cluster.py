"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd with their config,
state, sockets and logs in one temporary folder, on free ports, stopped on close.

Clients reach it through SLURM_CONF (see `LocalCluster.env`). Nothing under /etc is used,
so it runs beside any system Slurm or munge.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
BINARIES = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "squeue")
SBIN = ("/usr/sbin", "/sbin")
# Job ids of a fresh test cluster start at 1, so their default rendezvous ports are 10001...:
# the session holds these (see conftest.slurm_cluster) as another job on the node would.
HELD_DEFAULT_PORTS = range(10000, 10064)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_installed() -> str | None:
    """Install the Debian packages if needed; return why the cluster cannot run, or None."""
    if not missing_binaries():
        return None
    script = REPO_ROOT / "slurm" / "install_local_cluster.sh"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return f"Slurm binaries {missing_binaries()} absent and not installable here (needs root and apt-get)"
    result = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600, check=False)
    missing = missing_binaries()
    if missing:
        tail = (result.stderr or result.stdout).strip()[-500:]
        return f"Slurm binaries {missing} absent and {script.name} failed (exit {result.returncode}): {tail}"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(predicate, timeout: float, what: str, logs=()) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {p}:\n{Path(p).read_text()[-2000:] if Path(p).exists() else '(missing)'}" for p in logs)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


class LocalCluster:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.cpus = cpus or max(2, os.cpu_count() or 1)
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), *SBIN])
        self._pidfiles = []

    # ---- lifecycle
    def start(self) -> "LocalCluster":
        munge_dir = self.root / "munge"
        munge_dir.mkdir(parents=True)
        munge_dir.chmod(0o711)
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir()
        self._pidfiles = [munge_dir / "munged.pid", self.root / "slurmctld.pid", self.root / "slurmd.pid"]
        self._run(
            [
                _which("munged"),
                "--force",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={munge_dir / 'munged.pid'}",
                f"--log-file={munge_dir / 'munged.log'}",
                f"--seed-file={munge_dir / 'munged.seed'}",
            ]
        )
        _wait(self.munge_socket.exists, 20, "munged's socket", [munge_dir / "munged.log"])
        self.conf.write_text(self._slurm_conf())
        self._run([_which("slurmctld"), "-f", str(self.conf)])
        self._run([_which("slurmd"), "-f", str(self.conf), "-N", self.node])
        _wait(
            self._node_idle,
            60,
            "the node to become idle",
            [self.root / "log" / "slurmctld.log", self.root / "log" / "slurmd.log"],
        )
        return self

    def _slurm_conf(self) -> str:
        user = os.environ.get("USER") or ("root" if os.geteuid() == 0 else str(os.geteuid()))
        r = self.root
        return f"""\
ClusterName=memlayers-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
SlurmUser={user}
SlurmdUser={user}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
# A requeued job becomes eligible by the clock alone: poll often so it starts at once.
SchedulerParameters=sched_interval=1,bf_interval=1
EnforcePartLimits=ALL
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
PartitionName=short Nodes={self.node} Default=NO MaxTime=1 State=UP
"""

    def _run(self, args: list[str]) -> None:
        result = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed (exit {result.returncode}): {result.stderr.strip()}")

    def _node_idle(self) -> bool:
        out = self.cmd(["sinfo", "-h", "-n", self.node, "-o", "%T"], check=False).strip()
        return out.startswith("idle")

    def close(self) -> None:
        self.cmd(["scancel", "--full", f"--user={os.environ.get('USER', 'root')}"], check=False)
        for pidfile in reversed(self._pidfiles):
            if not pidfile.exists():
                continue
            try:
                pid = int(pidfile.read_text().strip())
                os.kill(pid, signal.SIGTERM)
            except (ValueError, ProcessLookupError):
                continue
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    # ---- client helpers
    def cmd(self, args: list[str], check: bool = True) -> str:
        exe = _which(args[0]) or args[0]
        # cwd: a job without --output writes slurm-<id>.out there, not into the checkout.
        result = subprocess.run(
            [exe, *args[1:]], env=self.env, cwd=self.root, capture_output=True, text=True, timeout=60, check=False
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed (exit {result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job -o` fields (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self.cmd(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, str]:
        info: dict[str, str] = {}

        def reached() -> bool:
            nonlocal info
            info = self.job_info(job_id)
            return info.get("JobState") in states

        _wait(
            reached,
            timeout,
            f"job {job_id} to reach {states} (now {info.get('JobState')})",
            [self.root / "log" / "slurmctld.log"],
        )
        return info


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A daemon we started may linger as a zombie until its parent (init) reaps it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (FileNotFoundError, IndexError):
        return False
