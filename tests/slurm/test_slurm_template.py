"""The rendered batch script's own logic, run by bash with a stand-in srun: the rendezvous
port it chooses (and refuses), and USR1 passed on from the batch shell to the training step."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tools.submit import main

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def render(capsys, tmp_path: Path, *extra: str) -> Path:
    rc = main(["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--cpu", *extra, "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    script = tmp_path / "job.sh"
    script.write_text(out)
    return script


def fake_srun(tmp_path: Path, body: str) -> dict:
    """A PATH whose `srun` runs `body` (sh); the environment of a batch shell of job 17007."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text("#!/bin/bash\n" + body)
    (bindir / "srun").chmod(0o755)
    return {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "SLURM_JOB_ID": "17007",
        "SLURM_JOB_NODELIST": "n1",
        "HOME": str(tmp_path),
    }


def listening_socket(port: int) -> socket.socket:
    sock = socket.socket()
    try:
        sock.bind(("", port))
    except OSError:
        sock.close()
        pytest.skip(f"port {port} is taken on this machine already")
    sock.listen(1)
    return sock


def test_busy_default_port_is_skipped(capsys, tmp_path):
    script = render(capsys, tmp_path)
    env = fake_srun(tmp_path, f'echo "$MASTER_PORT" > {tmp_path}/port\n')
    with listening_socket(27007):  # job 17007's default port, held by another process
        subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    port = int((tmp_path / "port").read_text())
    assert port != 27007 and 27007 < port <= 29999


def test_free_default_port_is_used(capsys, tmp_path):
    script = render(capsys, tmp_path)
    env = fake_srun(tmp_path, f'echo "$MASTER_PORT" > {tmp_path}/port\n')
    with socket.socket() as probe:
        try:
            probe.bind(("", 27007))
        except OSError:
            pytest.skip("port 27007 is taken on this machine")
    subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    assert (tmp_path / "port").read_text().strip() == "27007"


def test_explicit_port_is_honoured_and_a_clash_is_an_error(capsys, tmp_path):
    with socket.socket() as s:
        s.bind(("", 0))
        free = s.getsockname()[1]
    script = render(capsys, tmp_path, "--master-port", str(free))
    env = fake_srun(tmp_path, f'echo "$MASTER_PORT" > {tmp_path}/port\n')
    subprocess.run(
        ["bash", str(script)],
        env={**env, "MASTER_PORT": "1"},
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert (tmp_path / "port").read_text().strip() == str(free)
    (tmp_path / "port").unlink()
    with listening_socket(free):
        result = subprocess.run(
            ["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1 and not (tmp_path / "port").exists()
    assert f"rendezvous port {free} (--master-port) is in use" in result.stderr


def time_wait_port() -> int:
    """A port whose only socket is a TIME_WAIT left by a closed listener (the store of a job that
    just ended on this node): nothing listens there, and a new store binds it (SO_REUSEADDR)."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # the server side closes first: its end waits in TIME_WAIT
    client.close()
    lines = [
        line.split() for name in ("/proc/net/tcp", "/proc/net/tcp6") for line in Path(name).read_text().splitlines()[1:]
    ]
    states = {fields[3] for fields in lines if fields[1].endswith(f":{port:04X}")}
    if "06" not in states or "0A" in states:
        pytest.skip(f"port {port} is not (only) in TIME_WAIT here: {states}")
    return port


def test_a_port_in_time_wait_is_not_in_use(capsys, tmp_path):
    """--master-port naming a port that only a TIME_WAIT socket holds (a requeued job restarting on
    the node it just left) starts the step: rank 0's own check (check_port_free) accepts it."""
    from pretrain.slurm import check_port_free

    port = time_wait_port()
    check_port_free(port, "n1")  # the reference: the trainer's check and the store can bind it
    script = render(capsys, tmp_path, "--master-port", str(port))
    env = fake_srun(tmp_path, f'echo "$MASTER_PORT" > {tmp_path}/port\n')
    result = subprocess.run(["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr  # was 1: "rendezvous port ... is in use"
    assert (tmp_path / "port").read_text().strip() == str(port)


def test_bad_master_port_option_is_refused(capsys, tmp_path):
    rc = main(["--config", TINY, f"train.run_dir={tmp_path}/run", "--cpu", "--master-port", "80", "--dry-run"])
    assert rc == 2 and "--master-port=80 must be a port number in 1024..65535" in capsys.readouterr().err


def test_usr1_to_the_batch_shell_reaches_the_step(capsys, tmp_path):
    """The step (here a stand-in srun) gets USR1 sent to the batch shell alone; the script
    waits for it and exits with its status."""
    script = render(capsys, tmp_path)
    body = (
        f"trap 'echo usr1 > {tmp_path}/got; exit 3' USR1\n"
        f"touch {tmp_path}/started\n"
        "for i in $(seq 600); do sleep 0.1; done\n"
    )
    env = fake_srun(tmp_path, body)
    shell = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    shell.send_signal(signal.SIGUSR1)
    out, _ = shell.communicate(timeout=30)
    assert (tmp_path / "got").read_text().strip() == "usr1"
    assert shell.returncode == 3  # the step's own status, not death by USR1 (-10)
    assert "batch shell: USR1 received" in out and "step finished" in out and "exit 3" in out


def test_sigterm_to_the_batch_shell_waits_for_the_step(capsys, tmp_path):
    """SIGTERM (scancel, the time limit) to the batch shell: it keeps waiting while the step
    checkpoints (the step gets its own SIGTERM from Slurm), then exits with the step's status."""
    script = render(capsys, tmp_path)
    body = f"touch {tmp_path}/started\nsleep 1\necho done > {tmp_path}/finished\n"
    env = fake_srun(tmp_path, body)
    shell = subprocess.Popen(["bash", str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not (tmp_path / "started").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    shell.send_signal(signal.SIGTERM)
    out, _ = shell.communicate(timeout=30)
    assert (tmp_path / "finished").is_file() and shell.returncode == 0, out


@pytest.mark.parametrize("cpu", [False, True])
def test_the_job_runs_on_its_own_accelerator_whatever_the_submitting_shell_exported(capsys, tmp_path, cpu):
    """sbatch passes the submitting shell's environment on: a DS_ACCELERATOR=cpu exported there (CPU
    tests on the login node) must not reach the tasks of a GPU job, which the step sees as cuda."""
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--dry-run"]
    rc = main([*argv, *(["--cpu"] if cpu else ["--gpus-per-node", "1"])])
    out, err = capsys.readouterr()
    assert rc == 0, err
    script = tmp_path / "job.sh"
    script.write_text(out)
    env = fake_srun(tmp_path, f'echo "$DS_ACCELERATOR" > {tmp_path}/accelerator\n')
    for inherited in ("cpu", "cuda"):
        subprocess.run(
            ["bash", str(script)],
            env={**env, "DS_ACCELERATOR": inherited},
            cwd=tmp_path,
            check=True,
            capture_output=True,
            timeout=60,
        )
        assert (tmp_path / "accelerator").read_text().strip() == ("cpu" if cpu else "cuda"), inherited
