"""tools/submit.py and pretrain.launch (with pretrain.sbatch_script and pretrain.resume_checks):
golden dry-run renderings, quoting, run-directory rules and bad input (no cluster needed, except
where the slurm_env fixture is used)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pretrain.launch import REPO_ROOT
from pretrain.sbatch_script import SlurmOptions, SubmitError, time_limit_seconds
from tools.submit import main

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "golden"
TINY = str(REPO_ROOT / "configs" / "tiny.yaml")
FIXED = ["--workdir", "/home/user/memlayers", "--python", "/opt/venv/bin/python"]

GOLDEN_CASES = {
    "gpu_1x8.sbatch": [
        "--config",
        TINY,
        "train.run_dir=/scratch/memlayers/runs/tiny-1x8",
        "train.max_steps=1000",
        "train.global_batch=64",
        "train.micro_batch=8",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "--cpus-per-task",
        "12",
        "--time",
        "04:00:00",
        "--partition",
        "gpu",
        "--account",
        "proj42",
        *FIXED,
    ],
    "gpu_4x8.sbatch": [
        "--config",
        TINY,
        "train.run_dir=/scratch/memlayers/runs/tiny-4x8",
        "optim.lr=1e-3",
        "train.global_batch=512",
        "train.micro_batch=8",
        "--nodes",
        "4",
        "--gpus-per-node",
        "8",
        "--cpus-per-task",
        "16",
        "--time",
        "2-00:00:00",
        "--partition",
        "gpu",
        "--account",
        "proj42",
        "--qos",
        "high",
        "--constraint",
        "h100",
        "--signal-seconds",
        "300",
        "--sbatch=--exclusive",
        "--sbatch=--mem=0",
        "--snapshot-code",
        "--job-name",
        "mem-4x8",
        "--master-port",
        "29123",
        *FIXED,
    ],
}


def _dry_run(capsys, argv) -> tuple[int, str, str]:
    rc = main([*argv, "--dry-run"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_dry_run_matches_golden(name, capsys):
    rc, out, err = _dry_run(capsys, GOLDEN_CASES[name])
    assert rc == 0, err
    # The checkout's location is the only machine-specific value (no snapshot: run from it).
    out = out.replace(str(REPO_ROOT), "@REPO_ROOT@")
    if os.environ.get("MEMLAYERS_UPDATE_GOLDEN") == "1":
        (GOLDEN / name).write_text(out)
    assert out == (GOLDEN / name).read_text()
    assert not Path("/scratch/memlayers").exists()
    assert err.startswith("plan: ") and " tokens per active parameter; " in err  # on stderr: stdout is the script


def test_golden_directives_are_what_sbatch_reads():
    text = (GOLDEN / "gpu_4x8.sbatch").read_text()
    directives = [line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=mem-4x8",
        "--nodes=4",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=16",
        "--time=2-00:00:00",
        "--signal=USR1@300",
        "--requeue",
        "--open-mode=append",
        "--output=/scratch/memlayers/runs/tiny-4x8/logs/slurm-%j.out",
        "--chdir=/home/user/memlayers",
        "--partition=gpu",
        "--account=proj42",
        "--qos=high",
        "--constraint=h100",
        "--exclusive",
        "--mem=0",
    ]
    # sbatch stops reading directives at the first command: all of them must come first.
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))


def test_cpu_variant_uses_tasks_and_no_gpus(capsys, tmp_path):
    rc, out, err = _dry_run(
        capsys,
        [
            "--config",
            TINY,
            "train.micro_batch=2",
            f"train.run_dir={tmp_path}/run",
            "--cpu",
            "--tasks-per-node",
            "2",
            "--cpus-per-task",
            "1",
            "--time",
            "10",
        ],
    )
    assert rc == 0, err
    assert "#SBATCH --ntasks-per-node=2" in out and "gpus" not in out
    assert "export DS_ACCELERATOR=cpu" in out and "export OMP_NUM_THREADS=1" in out


def test_dry_run_leaves_nothing_behind(capsys, tmp_path):
    rc, out, _ = _dry_run(
        capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--snapshot-code"]
    )
    assert rc == 0 and out.startswith("#!/bin/bash")
    assert list(tmp_path.iterdir()) == []


def _run_rendered_script(script: str, tmp_path: Path) -> list[str]:
    """Execute a rendered script with a stand-in srun that records the trainer's argv."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "argv"
    (bindir / "srun").write_text(
        f'#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > {shlex.quote(str(record))}\n'
    )
    (bindir / "srun").chmod(0o755)
    script_path = tmp_path / "job.sh"
    script_path.write_text(script)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", "HOME": str(tmp_path)}
    subprocess.run(["bash", str(script_path)], env=env, cwd=tmp_path, check=True, capture_output=True, timeout=60)
    return record.read_text().split("\0")[:-1]


def test_values_are_quoted_not_spliced(capsys, tmp_path):
    evil = tmp_path / "a b $(touch pwned) ;echo x"
    rc, out, err = _dry_run(
        capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={evil}", "--cpu", "--python", "/bin/echo"]
    )
    assert rc == 0, err
    argv = _run_rendered_script(out, tmp_path)
    assert argv[-5:] == ["/bin/echo", "-m", "pretrain.train", "--config", str(evil / "config.yaml")]
    assert not (tmp_path / "pwned").exists()


def test_tasks_are_launched_with_srun_and_the_resolved_config(capsys, tmp_path):
    rc, out, _ = _dry_run(
        capsys,
        [
            "--config",
            TINY,
            "train.micro_batch=2",
            f"train.run_dir={tmp_path}/run",
            "--cpus-per-task",
            "4",
            "--python",
            "/opt/py/bin/python3",
        ],
    )
    assert rc == 0
    argv = _run_rendered_script(out, tmp_path)
    # srun runs a bash that prints where the task runs, then execs the trainer with the rest.
    assert argv[:5] == ["--label", "--kill-on-bad-exit=1", "--cpus-per-task=4", "bash", "-c"]
    assert argv[5].endswith('; exec "$@"') and argv[6] == "task"
    assert argv[7:] == ["/opt/py/bin/python3", "-m", "pretrain.train", "--config", f"{tmp_path}/run/config.yaml"]


@pytest.mark.parametrize(
    "value, seconds",
    [
        ("90", 5400),
        ("1:30", 90),
        ("2:00:00", 7200),
        ("30:00:00", 108000),
        ("1-0", 86400),
        ("1-2:3", 93780),
        ("1-2:3:4", 93784),
        ("UNLIMITED", None),
        ("infinite", None),
    ],
)
def test_time_strings_slurm_accepts(value, seconds):
    assert time_limit_seconds(value) == seconds


@pytest.mark.parametrize("value", ["", "0", "1h", "1:60", "1:99:00", "1-24", "1-2:3:4:5", "-5", "1:2:3:4", "0:00:00"])
def test_invalid_time_strings_are_refused(value):
    with pytest.raises(SubmitError, match="--time"):
        time_limit_seconds(value)


def _submit(capsys, argv) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as exit_:  # refused when the arguments are parsed
        rc = exit_.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_invalid_time_fails_before_creating_anything(capsys, tmp_path):
    rc, _, err = _submit(
        capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--time", "1:99:00"]
    )
    assert rc == 2 and "--time '1:99:00'" in err and "minutes must be below 60" in err
    assert not (tmp_path / "run").exists()


def test_missing_sbatch_is_reported_and_run_dir_removed(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    rc, _, err = _submit(
        capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--cpu", "--snapshot-code"]
    )
    assert rc == 2 and "sbatch not found on PATH" in err
    assert not (tmp_path / "run").exists()
    # the folders made for a new run directory's path go too (they stayed, empty: runs/2026/run)
    rc, _, err = _submit(
        capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/runs/2026/a", "--cpu"]
    )
    assert rc == 2 and "sbatch not found on PATH" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def test_sbatch_on_a_machine_without_slurm_says_what_its_words_mean(capsys, tmp_path, monkeypatch):
    """Debian's sbatch (Slurm 22.05) on a machine with no slurm.conf, as a new user's laptop or this one
    without its test cluster, ends with 'fatal: Could not establish a configuration source', which
    memlayers-submit passed on alone. It now adds what that means and --dry-run; nothing is left."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text(
        "#!/bin/sh\n"
        "echo 'sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host' >&2\n"
        "echo 'sbatch: error: fetch_config: DNS SRV lookup failed' >&2\n"
        "echo 'sbatch: error: _establish_config_source: failed to fetch config' >&2\n"
        "echo 'sbatch: fatal: Could not establish a configuration source' >&2\n"
        "exit 1\n"
    )
    (bindir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    rc, _, err = _submit(capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--cpu"])
    assert rc == 2 and "sbatch: fatal: Could not establish a configuration source" in err
    assert "sbatch finds no Slurm configuration on this machine" in err and "pass --dry-run" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train.nope=1"], "unknown config key 'train.nope'"),
        (["train.global_batch=7"], "train.global_batch"),
        (
            ["train.micro_batch=16", "--nodes", "2", "--gpus-per-node", "4"],
            "train.global_batch=16 is not divisible by train.micro_batch=16 x world size 8",
        ),
        (["--cpu", "train.dtype=fp16", "model.memory.layers=[]"], "train.dtype=fp16 is not supported on CPU"),
        (["train.dtype=fp16"], "train.dtype=fp16 is not supported with memory layers"),
        (["--gpus-per-node", "4", "--tasks-per-node", "2"], "one task per GPU"),
        (["--time", "10:00", "--signal-seconds", "600"], "--signal-seconds=600"),
        (["--partition", "gpu debug"], "--partition='gpu debug'"),
        (  # a job name may hold spaces (quoted in its #SBATCH line), not what breaks the quoting
            ["--job-name", "Ada's run"],
            '--job-name="Ada\'s run": #SBATCH values must be non-empty without quotes, backslashes or newlines',
        ),
        # named as the run directory, not as the --job-name the user never gave (derived from it)
        (["train.run_dir=/tmp/it's"], 'train.run_dir="/tmp/it\'s/logs/slurm-%j.out": #SBATCH values'),
        (["--sbatch=mem=4G"], "must be one sbatch option"),
        (
            ["--sbatch=--comment=it's"],
            '--sbatch "--comment=it\'s" cannot be split into words (No closing quotation): close its quotes',
        ),
        (["--sbatch=--comment=a\\"], "cannot be split into words (No escaped character)"),
        (  # sbatch read "world" as a directive of its own and refused the job
            ["--sbatch=--comment=hello world"],
            "'world' is a word of its own after --comment=hello: quote the value, e.g. --sbatch=\"--comment='hello world'\"",
        ),
        (  # the option's value as a word of its own: the example quoted '4G world' as the value of '4G'
            ["--sbatch=--comment hello world --exclusive"],
            "'world' is a word of its own after hello: quote the value, e.g. --sbatch=\"--comment='hello world'\"",
        ),
        (
            ["--time", "3-00:00:00", "--signal-seconds", "70000"],
            "--signal-seconds=70000 exceeds 65535, the most Slurm's --signal accepts",
        ),
        (["--nodes", "0"], "argument --nodes: 0 must be an integer >= 1"),
        (["--cpus-per-task", "-1"], "argument --cpus-per-task: -1 must be an integer >= 1"),
    ],
)
def test_bad_input_is_named_and_nothing_is_created(argv, message, capsys, tmp_path):
    rc, _, err = _submit(capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", *argv])
    assert rc == 2 and message in err, err
    assert not (tmp_path / "run").exists()


def test_another_runs_directory_is_never_reused(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("someone else's")
    rc, _, err = _submit(capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", "--dry-run"])
    assert rc == 2 and "already exists" in err and "--resume" in err
    rc, _, err = _submit(
        capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", "--resume", "--dry-run"]
    )
    assert rc == 2 and "not a run directory" in err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_resume_requires_the_same_resolved_config(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the working directory of the first submission (relative paths are read there)
    run = tmp_path / "run"
    # A first submission whose sbatch is missing leaves nothing; make the run dir by hand
    # through the library, as a successful submission would.
    from pretrain.launch import materialise, plan_run

    plan = plan_run(TINY, ["train.micro_batch=2", f"train.run_dir={run}"], SlurmOptions(cpu=True), workdir=tmp_path)
    materialise(plan)
    rc, _, err = _submit(
        capsys,
        ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", "optim.beta2=0.99", "--resume", "--dry-run"],
    )
    assert rc == 2 and "resolved config differs" in err and "in optim.beta2 (a different run)" in err
    # how the data is read (the trainer re-plans it) and hang handling may change; the run's config is replaced only
    # by a submission that goes through, and a failed one puts the old config back (below)
    rc, _, err = _submit(
        capsys,
        [
            "--config",
            TINY,
            "train.micro_batch=4",
            f"train.run_dir={run}",
            "data.num_workers=2",
            "train.hang_timeout_s=120",
            "train.checkpoint_every=50",  # after preemptions, say: no saved state depends on it
            "train.keep_checkpoints=5",
            "--resume",
            "--dry-run",
            "--cpu",
        ],
    )
    assert rc == 0, err
    rc, out, err = _submit(
        capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", "--resume", "--dry-run", "--cpu"]
    )
    assert rc == 0, err
    rc, _, err = _submit(
        capsys, ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/fresh", "--resume", "--dry-run"]
    )
    assert rc == 2 and "does not exist" in err
    # A failed resubmission removes only what it added, never the run's own files.
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    rc, _, err = _submit(
        capsys,
        ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", "--resume", "--cpu", "--snapshot-code"],
    )
    assert rc == 2 and "sbatch not found" in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    config = (run / "config.yaml").read_text()
    rc, _, err = _submit(capsys, ["--config", TINY, "train.micro_batch=4", f"train.run_dir={run}", "--resume", "--cpu"])
    assert rc == 2 and "sbatch not found" in err
    assert (run / "config.yaml").read_text() == config  # the changed micro-batch was rolled back


@pytest.mark.parametrize(
    "partition,minutes,message",
    [
        ("nosuchpartition", "5", "invalid partition name specified"),
        ("short", "10", "time limit"),  # the test cluster's "short" partition allows 1 minute
    ],
)
def test_sbatch_refusals_surface_its_message(capsys, tmp_path, slurm_env, partition, minutes, message):
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--cpu"]
    rc, _, err = _submit(capsys, [*argv, "--time", minutes, "--partition", partition])
    assert rc == 2 and "sbatch refused the job" in err and message in err.lower(), err
    assert not (tmp_path / "run").exists()


def test_resume_may_extend_the_schedule_only_where_the_steps_taken_keep_their_rates(capsys, tmp_path, monkeypatch):
    """A resubmission that would give the latest checkpoint's steps other learning rates is
    refused before it is queued; one that extends a warmup-stable-decay run before its decay goes."""
    from pretrain.launch import materialise, plan_run

    monkeypatch.chdir(tmp_path)  # the working directory of the first submission

    run = tmp_path / "run"
    wsd = ["train.micro_batch=2", f"train.run_dir={run}", "optim.decay_fraction=0.2", "train.max_steps=1000"]
    materialise(plan_run(TINY, wsd, SlurmOptions(cpu=True), workdir=tmp_path))
    checkpoint = run / "checkpoints" / "step_00000600"  # what the trainer reads of it: its config
    checkpoint.mkdir(parents=True)
    (checkpoint / "config.yaml").write_text((run / "config.yaml").read_text())
    (run / "checkpoints" / "latest").write_text("step_00000600")

    longer = [*wsd, "train.max_steps=3000", "--resume", "--dry-run", "--cpu"]
    rc, _, err = _submit(capsys, ["--config", TINY, *longer])
    assert rc == 0, err  # the decay began at step 800; now at 2400
    rc, _, err = _submit(capsys, ["--config", TINY, *longer, "optim.decay_shape=linear"])
    assert rc == 0, err  # the shape of a decay not yet begun
    rc, _, err = _submit(capsys, ["--config", TINY, *longer, "optim.lr=1e-3"])
    assert rc == 2 and "--resume: resuming at step 600 with another learning-rate schedule" in err
    assert "optim.lr 0.003 -> 0.001" in err and "optim.allow_schedule_change=true" in err
    rc, _, err = _submit(capsys, ["--config", TINY, *longer, "optim.lr=1e-3", "optim.allow_schedule_change=true"])
    assert rc == 0, err


def test_a_new_run_from_an_export_that_does_not_fit_is_refused_before_it_is_queued(capsys, tmp_path):
    """train.init_from is checked at submission (files, model settings), not after the queue."""
    export = tmp_path / "export"
    export.mkdir()
    run = tmp_path / "run"
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", f"train.init_from={export}", "--cpu"]
    rc, _, err = _submit(capsys, [*argv, "--dry-run"])
    assert rc == 2 and f"train.init_from={export} has no config.json" in err
    (export / "config.json").write_text('{"model": {"dim": 64}}')
    for name in ("model.safetensors", "tokenizer.model"):
        (export / name).write_bytes(b"")
    rc, _, err = _submit(capsys, [*argv, "--dry-run"])
    assert rc == 2 and f"train.init_from={export}: {export}/model.safetensors is truncated" in err
    assert not run.exists()


def test_resume_may_change_the_mixture(capsys, tmp_path, data_cache, monkeypatch):
    """An annealing mixture is resubmitted with other weights, or with a source added; a source
    renamed over the same dir (which would read it again from the start) is refused."""
    from pretrain.config import load_config
    from pretrain.data import prepare_embedded_dataset
    from pretrain.launch import materialise, plan_run

    monkeypatch.chdir(tmp_path)  # the working directory of the first submission

    cfg = load_config(TINY, [f"data.cache_dir={data_cache}"])
    data = prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
    run = tmp_path / "run"

    other = shutil.copytree(data, tmp_path / "other")  # a second corpus of the same tokenizer

    def mix(a: float, b: float, name: str = "b") -> str:
        return f"data.sources=[{{dir: {data}, weight: {a}, name: a}}, {{dir: {other}, weight: {b}, name: {name}}}]"

    base = ["train.micro_batch=2", f"train.run_dir={run}"]
    materialise(plan_run(TINY, [*base, mix(1.0, 2.0)], SlurmOptions(cpu=True), workdir=tmp_path))
    rc, _, err = _submit(capsys, ["--config", TINY, *base, mix(3.0, 1.0), "--resume", "--dry-run", "--cpu"])
    assert rc == 0, err
    second_data = shutil.copytree(data, tmp_path / "more")  # another corpus of the same tokenizer
    added = mix(1.0, 2.0).removesuffix("]") + f", {{dir: {second_data}, weight: 1.0, name: c}}]"
    rc, _, err = _submit(capsys, ["--config", TINY, *base, added, "--resume", "--dry-run", "--cpu"])
    assert rc == 0, err
    rc, _, err = _submit(capsys, ["--config", TINY, *base, mix(1.0, 2.0, "c"), "--resume", "--dry-run", "--cpu"])
    assert rc == 2 and f"--resume: data.sources: 'c' reads {other}, which this run read as 'b' so far" in err
    rc, _, err = _submit(
        capsys, ["--config", TINY, *base, mix(1.0, 2.0), "train.seed=1", "--resume", "--dry-run", "--cpu"]
    )
    assert rc == 2 and "in train.seed (a different run)" in err


def test_relative_paths_are_read_in_the_jobs_working_directory_and_saved_absolute(tmp_path, monkeypatch, data_cache):
    """The job runs in --workdir (#SBATCH --chdir), not where memlayers-submit was called: a
    relative data.dir, data.sources[].dir, data.eval_sources[].dir or data.cache_dir means a path
    there, is checked there, and the saved config names it absolutely."""
    from pretrain.config import load_config
    from pretrain.data import prepare_embedded_dataset
    from pretrain.launch import plan_run

    data = prepare_embedded_dataset(load_config(TINY, [f"data.cache_dir={data_cache}"]).data, 128, show_progress=False)
    submitter, workdir = tmp_path / "submitter", tmp_path / "work"
    for name in ("train", "held"):
        shutil.copytree(data, workdir / "data" / name)
    submitter.mkdir()
    monkeypatch.chdir(submitter)  # holds no data/
    base = ["train.micro_batch=2", f"train.run_dir={tmp_path}/run", "data.cache_dir=cache"]
    mixture = ["data.sources=[{dir: data/train}]", "data.eval_sources=[{dir: data/held}]"]
    for overrides in (["data.dir=data/train"], mixture):
        plan = plan_run(TINY, [*base, *overrides], SlurmOptions(cpu=True), workdir=workdir)
        saved = yaml.safe_load(plan.config_text)["data"]
        assert saved["cache_dir"] == str(workdir / "cache")
        dirs = [saved["dir"]] if saved["dir"] else [s["dir"] for s in (*saved["sources"], *saved["eval_sources"])]
        assert dirs == (
            [str(workdir / "data/train")] if saved["dir"] else [str(workdir / p) for p in ("data/train", "data/held")]
        )
        (tmp_path / "config.yaml").write_text(plan.config_text)
        monkeypatch.chdir(workdir / "data")  # the saved config reads the same data from anywhere
        assert load_config(tmp_path / "config.yaml").data.seq_len == 128
        monkeypatch.chdir(submitter)
    shutil.copytree(data, submitter / "data" / "only-here")  # where the submitter is, not where the job runs
    with pytest.raises(SubmitError, match=rf"data.dir={workdir}/data/only-here: .*holds no manifest.json"):
        plan_run(TINY, [*base, "data.dir=data/only-here"], SlurmOptions(cpu=True), workdir=workdir)


def test_resume_reads_relative_paths_of_a_config_saved_before_as_paths_in_the_workdir(capsys, tmp_path):
    """Run directories made before paths were saved absolute hold data.cache_dir: .cache/data:
    their --resume is not refused as a different run. Another working directory is another cache."""
    from pretrain.launch import materialise, plan_run

    run = tmp_path / "run"
    materialise(
        plan_run(TINY, ["train.micro_batch=2", f"train.run_dir={run}"], SlurmOptions(cpu=True), workdir=tmp_path)
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["cache_dir"] == str(tmp_path / ".cache/data")
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", "--resume", "--dry-run", "--cpu"]
    rc, _, err = _submit(capsys, [*argv, "--workdir", str(run)])
    assert rc == 2 and "in data.cache_dir (a different run)" in err
    assert f"relative paths are read in the working directory {run}: pass the run's --workdir" in err
    saved["data"]["cache_dir"] = ".cache/data"  # as the earlier version saved it
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    rc, _, err = _submit(capsys, [*argv, "--workdir", str(tmp_path)])
    assert rc == 0, err


def test_resume_may_change_what_lowers_the_memory_per_rank(capsys, tmp_path, monkeypatch):
    """What the out-of-memory advice recommends and the trainer accepts on resume: a 2 x 2 run
    with P = 4 resubmitted on one node with P = 2, another attention or activation
    checkpointing, ZeRO 1 <-> 2. ZeRO 0 <-> 1 or 2 <-> 3 (another optimizer-state layout, which
    DeepSpeed cannot load) and model shapes are still refused."""
    from pretrain.launch import materialise, plan_run

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    first = ["train.micro_batch=4", f"train.run_dir={run}", "model.memory.parallel_size=4", "train.zero_stage=1"]
    materialise(plan_run(TINY, first, SlurmOptions(cpu=True, nodes=2, tasks_per_node=2)))
    resume = ["--config", TINY, "train.micro_batch=4", f"train.run_dir={run}", "--resume", "--dry-run", "--cpu"]
    for changes in (
        ["model.memory.parallel_size=2", "train.zero_stage=1", "--tasks-per-node", "2"],
        ["model.memory.parallel_size=4", "train.zero_stage=2", "--nodes", "2", "--tasks-per-node", "2"],
        [
            "model.memory.parallel_size=2",
            "train.zero_stage=2",
            "model.document_attention=flex",
            "train.activation_checkpointing=selective",
            "train.activation_checkpointing_layers=[1]",
            "--tasks-per-node",
            "2",
        ],
        ["model.memory.parallel_size=1", "train.zero_stage=1", "train.activation_checkpointing=full"],
    ):
        rc, _, err = _submit(capsys, [*resume, *changes])
        assert rc == 0, (changes, err)
    for changes, key in (
        (["model.memory.parallel_size=1", "train.zero_stage=0"], "train.zero_stage"),
        (["model.memory.parallel_size=1", "train.zero_stage=3"], "train.zero_stage"),
        (["model.memory.parallel_size=1", "train.zero_stage=1", "model.n_heads=8"], "model.n_heads"),
    ):
        rc, _, err = _submit(capsys, [*resume, *changes])
        assert rc == 2 and f"resolved config differs from {run}/config.yaml in {key} (a different run)" in err, err
        assert "and train.zero_stage between 1 and 2" in err


def test_resume_with_a_code_snapshot_replaces_a_stale_previous_snapshot(capsys, tmp_path, monkeypatch):
    """A code.previous left by an interrupted submission made the next --resume --snapshot-code
    fail to rename code/ (and the rollback's own error hid that)."""
    from pretrain.launch import materialise, plan_run

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    materialise(plan_run(TINY, ["train.micro_batch=2", f"train.run_dir={run}"], SlurmOptions(cpu=True), snapshot=True))
    (run / "code" / "MARK").write_text("the run's snapshot")
    (run / "code.previous").mkdir()
    (run / "code.previous" / "STALE").write_text("left behind")
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", "--resume", "--cpu", "--snapshot-code"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    rc, _, err = _submit(capsys, argv)
    assert rc == 2 and "sbatch not found" in err, err
    assert (run / "code" / "MARK").is_file() and not (run / "code.previous").exists()  # put back
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sbatch").write_text("#!/bin/sh\necho 4242\n")
    (bindir / "sbatch").chmod(0o755)
    (run / "code.previous").mkdir()
    (run / "code.previous" / "STALE").write_text("left behind")
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    rc, out, err = _submit(capsys, argv)
    assert rc == 0 and "submitted job 4242" in out, err
    assert (run / "code" / "pretrain" / "launch.py").is_file() and not (run / "code" / "MARK").exists()
    assert not (run / "code.previous").exists()


def test_a_snapshot_put_back_after_a_failed_submission_is_on_disk(capsys, tmp_path, monkeypatch):
    """The rollback renamed code.previous back to code/ without flushing the run folder: after a
    power cut a job queued earlier, which runs from code/, could find none. Also the rename aside."""
    from pretrain.launch import materialise, plan_run
    from tests.syscall_log import SyscallLog

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    materialise(plan_run(TINY, ["train.micro_batch=2", f"train.run_dir={run}"], SlurmOptions(cpu=True), snapshot=True))
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", "--resume", "--cpu", "--snapshot-code"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    log = SyscallLog(monkeypatch)
    rc, _, err = _submit(capsys, argv)
    assert rc == 2 and "sbatch not found" in err, err
    aside = log.events.index(("rename", str(run / "code"), str(run / "code.previous")))
    back = log.rename_onto(run / "code")
    assert log.events[back][1] == str(run / "code.previous") and aside < back
    assert str(run) in log.synced(aside + 1, aside + 2)  # right after it, before the new snapshot is copied
    assert str(run) in log.synced(back + 1, len(log.events)), "the snapshot put back, its name not flushed"


def test_a_failed_rollback_is_reported_with_the_error_that_caused_it(tmp_path, monkeypatch):
    from pretrain import launch

    plan = launch.plan_run(
        TINY, ["train.micro_batch=2", f"train.run_dir={tmp_path}/run"], SlurmOptions(cpu=True), workdir=tmp_path
    )

    def broken_rollback(plan):
        raise PermissionError(13, "Permission denied", str(plan.run_dir))

    monkeypatch.setattr(launch, "rollback", broken_rollback)
    with pytest.raises(SubmitError) as err:
        launch.submit(plan, sbatch_bin=str(tmp_path / "no-sbatch"))
    assert str(err.value).startswith("sbatch not found on PATH")
    assert f"(and putting {tmp_path}/run back failed: [Errno 13] Permission denied" in str(err.value)


def _queued(cluster) -> list[str]:
    """This user's job ids that squeue lists (pending, running, held, completing)."""
    return sorted(cluster.cmd(["squeue", "--me", "--noheader", "--format=%i"]).split())


def test_resume_while_a_job_of_the_run_is_queued_is_refused(capsys, tmp_path, slurm_env):
    """A --resume while a job of the same run directory is still queued would train that directory
    twice at once; it is refused, naming the job, and nothing is queued. A sweep --resume leaves such
    runs out, saying so."""
    base = tmp_path / "a b|c"  # the script's path, as squeue prints it, holds squeue's separator
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={base}", "--cpu", "--time", "5"]
    sweep = ["--sweep", "optim.lr=1e-3,2e-3"]
    before = _queued(slurm_env)
    rc, out, err = _submit(capsys, [*argv, *sweep, "--sbatch=--hold"])  # held: queued, never started
    assert rc == 0, err
    jobs = sorted(set(_queued(slurm_env)) - set(before))
    assert len(jobs) == 2, (before, jobs)
    other = tmp_path / "other"  # another run's queued job does not block this one
    rc, _, err = _submit(capsys, [*argv[:3], f"train.run_dir={other}", *argv[4:], "--sbatch=--hold"])
    assert rc == 0, err
    queued = _queued(slurm_env)
    try:
        rc, out, err = _submit(capsys, [*argv, *sweep, "--resume"])
        assert rc == 0 and "nothing to resubmit" in out, err
        named = [line.split("not resubmitted: job ")[1].split()[0] for line in out.splitlines() if "job " in line]
        assert sorted(named) == jobs and f"sweep run lr=1e-3: not resubmitted: job {named[0]} (PENDING)" in out
        rc, _, err = _submit(capsys, [*argv[:3], f"train.run_dir={base / 'lr=2e-3'}", *argv[4:], "--resume"])
        assert rc == 2 and "(PENDING)" in err and "still in the queue" in err and f"scancel {named[1]}" in err, err
        assert _queued(slurm_env) == queued  # nothing was added
        slurm_env.cmd(["scancel", *jobs])
        deadline = time.monotonic() + 60
        while set(jobs) & set(_queued(slurm_env)) and time.monotonic() < deadline:
            time.sleep(0.2)
        rc, out, err = _submit(capsys, [*argv, *sweep, "--resume", "--sbatch=--hold"])
        assert rc == 0 and out.count("submitted job ") == 2, err
    finally:
        slurm_env.cmd(["scancel", *sorted(set(_queued(slurm_env)) - set(before))], check=False)


def test_a_code_snapshot_under_a_path_with_a_colon_is_refused(capsys, tmp_path):
    """PYTHONPATH splits at ':', so a snapshot in <run_dir>/code under such a path is not what the job
    imports (Python itself shows it below); submit refuses it before writing anything."""
    run = tmp_path / "2026-12-06T03:40"
    (run / "code" / "probe_pkg").mkdir(parents=True)
    (run / "code" / "probe_pkg" / "__init__.py").write_text("")
    found = subprocess.run(
        [sys.executable, "-P", "-c", "import importlib.util; print(importlib.util.find_spec('probe_pkg') is None)"],
        env={**os.environ, "PYTHONPATH": str(run / "code")},
        capture_output=True,
        text=True,
        check=True,
    )
    assert found.stdout.strip() == "True"  # Python does not find the module there
    shutil.rmtree(run)
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={run}", "--cpu"]
    rc, out, err = _submit(capsys, [*argv, "--snapshot-code"])
    assert rc == 2 and "train.run_dir" in err and "without ':' or drop --snapshot-code" in err, err
    assert not run.exists() and out == ""
    rc, out, err = _submit(capsys, [*argv, "--dry-run"])  # without a snapshot the path is only data
    assert rc == 0 and shlex.quote(str(run / "config.yaml")) in out, err


def test_resume_of_a_finished_run_is_refused_and_a_sweep_leaves_it_out(capsys, tmp_path, monkeypatch):
    """A run whose latest checkpoint is at train.max_steps has nothing left to train: --resume is
    refused before anything is queued, naming train.max_steps; a sweep --resume resubmits the others."""
    from tests.slurm.test_slurm_sweep import fake_sbatch

    calls = fake_sbatch(tmp_path, monkeypatch)
    base = tmp_path / "sweep"
    argv = ["--config", TINY, "--cpu", "train.micro_batch=2", f"train.run_dir={base}", "train.max_steps=50"]
    assert main([*argv, "--sweep", "train.seed=0,1,2"]) == 0
    for seed, step in ((0, 50), (1, 49)):  # what the trainer leaves: seed=0 finished, seed=1 one step short
        run = base / f"seed={seed}"
        checkpoint = run / "checkpoints" / f"step_{step:08d}"
        checkpoint.mkdir(parents=True)
        (checkpoint / "config.yaml").write_text((run / "config.yaml").read_text())
        (run / "checkpoints" / "latest").write_text(checkpoint.name)
    capsys.readouterr()
    single = [*argv[:4], f"train.run_dir={base / 'seed=0'}", "train.max_steps=50", "train.seed=0", "--resume"]
    rc, _, err = _submit(capsys, single)
    assert rc == 2 and "is finished: its latest checkpoint step_00000050 is at step 50" in err, err
    assert "train.max_steps=50" in err and "raise train.max_steps" in err
    assert len(calls.read_text().split()) == 3  # the sweep's three; nothing more
    rc, out, err = _submit(capsys, [*argv, "--sweep", "train.seed=0,1,2", "--resume"])
    assert rc == 0, err
    assert "sweep run seed=0: not resubmitted:" in out and "is finished" in out
    assert calls.read_text().split()[3:] == [str(base / f"seed={s}" / "train.sbatch") for s in (1, 2)]
    record = json.loads((base / "sweep.json").read_text())["runs"]
    assert [(r["name"], r["job_id"]) for r in record] == [("seed=0", "101"), ("seed=1", "104"), ("seed=2", "105")]


def test_sbatch_takes_the_last_directive_so_extra_options_may_not_set_the_scripts_own(capsys, tmp_path, slurm_env):
    """sbatch itself takes the later of two #SBATCH lines (a held job shows it): an --sbatch option that
    the script sets already would override it past the checks (a job of 2 ranks whose config was
    checked for 1), so it is refused, naming the option to use; other options pass."""
    script = tmp_path / "two.sh"
    script.write_text("#!/bin/bash\n#SBATCH --ntasks-per-node=1\n#SBATCH --ntasks-per-node=2\n#SBATCH --hold\ntrue\n")
    job = slurm_env.cmd(["sbatch", "--parsable", f"--output={tmp_path}/%j.out", str(script)]).strip()
    try:
        assert slurm_env.job_info(job)["NumTasks"] == "2"
    finally:
        slurm_env.cmd(["scancel", job], check=False)
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--cpu", "--dry-run"]
    for option, fix in [
        ("--ntasks-per-node=2", "use --gpus-per-node (--tasks-per-node with --cpu)"),
        ("--ntasks-per=2", "use --gpus-per-node"),  # sbatch takes a unique prefix of a long option
        ("-N 2", "use --nodes"),
        ("-N2", "use --nodes"),
        ("--time=5", "use --time"),
        ("--output=/tmp/x.out", "drop it (the log is <run_dir>/logs/slurm-<job id>.out)"),
        ("--no-requeue", "drop it"),
        ("--signal=B:USR1@60", "use --signal-seconds"),
    ]:
        rc, out, err = _submit(capsys, [*argv, f"--sbatch={option}"])
        assert rc == 2 and "which the script sets itself" in err and fix in err, (option, err)
        assert out == ""
    for option in ("--mem=0", "--exclusive", "--hold", "--time-min=5", "--nodelist=n1", "--mail-type=END"):
        rc, out, err = _submit(capsys, [*argv, f"--sbatch={option}"])
        assert rc == 0 and f"#SBATCH {option}" in out, (option, err)


def test_extra_options_may_not_ask_for_gpus_past_gpus_per_node(capsys, tmp_path):
    """--sbatch=--gres=gpu:2 (a later #SBATCH line) asked for 2 GPUs per node under a script that
    requests 8 and starts 8 ranks; GPU counts come from --gpus-per-node, so such a request is
    refused naming that option. Other generic resources (a local disk) pass."""
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--dry-run"]
    for option, named in [
        ("--gres=gpu:2", "--gres"),
        ("--gres=gpu", "--gres"),
        ("--gres=gpu:a100:4", "--gres"),
        ("--gres=nvme:1,gpu:2", "--gres"),
        ("--gres=GPU:2", "--gres"),
        ("--gres gpu:2", "--gres"),  # the value as the next word, as sbatch reads it too
        ("--tres-per-task=gres/gpu=1", "--tres-per-task"),
        ("--tres-per-task=cpu=4", "--tres-per-task"),
    ]:
        rc, out, err = _submit(capsys, [*argv, f"--sbatch={option}"])
        assert rc == 2 and out == "", (option, err)
        assert f"through {named}, which the script requests itself" in err and "use --gpus-per-node" in err, err
    for option, fix in [
        ("--gpus-per-socket=2", "use --gpus-per-node"),
        ("--cpus-per-gpu=4", "use --cpus-per-task"),
        ("--cpus-per=4", "use --cpus-per-task"),  # a prefix of --cpus-per-task and --cpus-per-gpu
        ("--gpus-per=2", "use --gpus-per-node"),
    ]:
        rc, out, err = _submit(capsys, [*argv, f"--sbatch={option}"])
        assert rc == 2 and "which the script sets itself" in err and fix in err, (option, err)
    for option in ("--gres=nvme:1", "--gres-flags=enforce-binding", "--gres=none", "--tres-per-task=license/x=1"):
        rc, out, err = _submit(capsys, [*argv, f"--sbatch={option}"])
        assert rc == 0 and f"#SBATCH {option}" in out, (option, err)


def test_sbatch_environment_variables_may_not_override_the_scripts_options(capsys, tmp_path, monkeypatch, slurm_env):
    """sbatch reads SBATCH_* variables of the submitting shell over the script's #SBATCH lines (a held
    job shows it): SBATCH_TIMELIMIT=5 in a profile ran every job 5 minutes long, past the check of
    --signal-seconds against --time. Such a variable is refused, naming it and the option to use; a
    site default (SBATCH_PARTITION) passes unless the option is given here too."""
    script = tmp_path / "timed.sh"
    script.write_text("#!/bin/bash\n#SBATCH --time=10\n#SBATCH --hold\ntrue\n")
    env = {**slurm_env.env, "SBATCH_TIMELIMIT": "5"}
    sbatch = [shutil.which("sbatch", path=env["PATH"]), "--parsable", f"--output={tmp_path}/%j.out", str(script)]
    job = subprocess.run(sbatch, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True)
    job = job.stdout.strip()
    try:
        assert slurm_env.job_info(job)["TimeLimit"] == "00:05:00"
    finally:
        slurm_env.cmd(["scancel", job], check=False)
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--cpu", "--dry-run"]
    for var, value, fix in [
        ("SBATCH_TIMELIMIT", "5", "unset SBATCH_TIMELIMIT and use --time instead"),
        ("SBATCH_SIGNAL", "USR1@60", "use --signal-seconds"),
        ("SBATCH_NO_REQUEUE", "1", "unset SBATCH_NO_REQUEUE: drop it"),
        ("SBATCH_OUTPUT", "/tmp/x.out", "unset SBATCH_OUTPUT"),
        ("SBATCH_GPUS_PER_NODE", "2", "use --gpus-per-node"),
        ("SBATCH_GRES", "gpu:2", "unset SBATCH_GRES (use --gpus-per-node)"),
    ]:
        monkeypatch.setenv(var, value)
        rc, out, err = _submit(capsys, argv)
        monkeypatch.delenv(var)
        assert rc == 2 and out == "" and f"{var}={value!r} in the environment" in err and fix in err, (var, err)
    for var, value in [("SBATCH_NO_REQUEUE", "0"), ("SBATCH_GRES", "nvme:1"), ("SBATCH_PARTITION", "debug")]:
        monkeypatch.setenv(var, value)
        rc, out, err = _submit(capsys, argv)
        monkeypatch.delenv(var)
        assert rc == 0, (var, err)
    monkeypatch.setenv("SBATCH_PARTITION", "debug")
    rc, _, err = _submit(capsys, [*argv, "--partition", "gpu"])
    assert rc == 2 and "SBATCH_PARTITION='debug' in the environment would override --partition=gpu" in err, err


def test_a_job_array_is_refused_naming_sweep(capsys, tmp_path):
    """--sbatch=--array=0-3 ran the script once per task, four trainings of one run directory writing
    the same checkpoints; several runs are a --sweep."""
    argv = ["--config", TINY, "train.micro_batch=2", f"train.run_dir={tmp_path}/run", "--cpu", "--dry-run"]
    for option in ("--array=0-3", "--array 0-3", "-a 0-3", "-a0-3", "--arr=0-1"):
        rc, out, err = _submit(capsys, [*argv, f"--sbatch={option}"])
        assert rc == 2 and out == "", (option, err)
        assert "each array task would train the same run directory" in err and "use --sweep" in err, err
    rc, out, err = _submit(capsys, [*argv, "--sbatch=--acctg-freq=task=60"])  # "-a..." long options are no -a
    assert rc == 0 and "#SBATCH --acctg-freq=task=60" in out, err


@pytest.mark.parametrize(
    "config, world, overrides",
    [
        ("tiny.yaml", (2, 8), []),  # global 16, micro 16 on 16 ranks: micro_batch=1 keeps the batch
        ("tiny.yaml", (1, 8), ["train.micro_batch=4"]),  # 16 on 8 ranks: micro_batch=2
        ("values_16m.yaml", (2, 8), []),  # global 8 on 16 ranks: no micro_batch fits
    ],
)
def test_a_batch_that_the_job_s_ranks_do_not_divide_names_values_that_work(config, world, overrides, capsys):
    """`memlayers-submit --config configs/tiny.yaml --nodes 2 --gpus-per-node 8` said only 'choose
    global_batch as a multiple of 256', 16 times the run's batch (another experiment), where
    train.micro_batch=1 keeps it. The refusal now names the micro_batch that keeps the global batch
    where one exists, else a global_batch; each suggestion, applied, is accepted."""
    nodes, gpus = world
    argv = ["--config", str(REPO_ROOT / "configs" / config), "--nodes", str(nodes), "--gpus-per-node", str(gpus)]
    rc, _, err = _dry_run(capsys, [*argv, *overrides])
    assert rc == 2
    suggested = re.findall(r"(train\.(?:micro|global)_batch=\d+)", err.split("world size")[1])
    assert suggested, err
    cfg = yaml.safe_load((REPO_ROOT / "configs" / config).read_text())
    global_batch = cfg["train"]["global_batch"]
    if global_batch % (nodes * gpus) == 0:  # a micro_batch fits: named first, and the global batch kept
        assert suggested[0].startswith("train.micro_batch="), err
    for fix in suggested:
        rc, _, err = _dry_run(capsys, [*argv, *overrides, fix])
        assert rc == 0, f"{fix}: {err}"


def test_a_path_starting_with_a_tilde_is_the_home_directory(capsys, tmp_path, monkeypatch):
    """`train.run_dir=~/runs/a` reaches the program as typed (the shell expands `~` after `=` only in
    variable assignments), and the run directory was `<workdir>/~/runs/a`: a folder named `~` in the
    checkout, which `rm -rf ~` would not remove but the home directory instead. A leading `~` is now
    the home directory, for the submitted job and the trainer alike; a `$HOME` no shell expanded (the
    override in single quotes) is refused, naming the key, instead of a folder named `$HOME`."""
    from pretrain.config import ConfigError, load_config

    home, workdir = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    workdir.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(workdir)
    rc, out, err = _dry_run(capsys, ["--config", TINY, "--cpu", "train.run_dir=~/runs/a", "data.cache_dir=~/cache"])
    assert rc == 0, err
    assert f"#SBATCH --output={home}/runs/a/logs/slurm-%j.out" in out
    assert f"--config {home}/runs/a/config.yaml" in out
    assert "~" not in out
    cfg = load_config(TINY, ["train.run_dir=~/runs/b", "data.cache_dir=~/cache"])  # the trainer's own reading
    assert (cfg.train.run_dir, cfg.data.cache_dir) == (f"{home}/runs/b", f"{home}/cache")
    assert not (workdir / "~").exists()
    rc, _, err = _dry_run(capsys, ["--config", TINY, "--cpu", "train.run_dir=$HOME/runs/a"])
    assert rc == 2 and "train.run_dir='$HOME/runs/a' holds a shell variable that no shell expanded" in err, err
    with pytest.raises(ConfigError, match="data.cache_dir='\\$HOME/cache' holds a shell variable"):
        load_config(TINY, ["data.cache_dir=$HOME/cache"])
    assert not (workdir / "$HOME").exists()


def test_the_job_runs_the_submitting_checkout_not_a_package_in_its_working_directory(capsys, tmp_path):
    """`python -m pretrain.train` puts the job's working directory first on sys.path, before PYTHONPATH:
    submitted from another checkout (or any folder with a `pretrain/`), with the tool of this one, the
    job ran that folder's trainer, not the code its config was checked with (seen on the test cluster:
    'THIS IS THE OTHER CHECKOUT', exit 0). The script now sets PYTHONSAFEPATH=1 with or without a
    code snapshot. Run here with a stand-in srun that executes the task's command line."""
    workdir = tmp_path / "other-checkout"
    (workdir / "pretrain").mkdir(parents=True)
    marker = tmp_path / "ran-the-other-checkout"
    (workdir / "pretrain" / "__init__.py").write_text("")
    (workdir / "pretrain" / "train.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    rc, out, err = _dry_run(
        capsys,
        [
            "--config",
            TINY,
            "--cpu",
            f"train.run_dir={tmp_path}/run",
            "--workdir",
            str(workdir),
            "--python",
            sys.executable,
        ],
    )
    assert rc == 0, err
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bindir / "srun").chmod(0o755)
    (tmp_path / "job.sh").write_text(out)
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "SLURM_JOB_ID": "1", "SLURM_JOB_NODELIST": "n1", "HOME": str(tmp_path)}
    job = subprocess.run(
        ["bash", str(tmp_path / "job.sh")], env=env, cwd=workdir, capture_output=True, text=True, timeout=300
    )
    assert not marker.exists(), "the job imported pretrain from its working directory"
    # this checkout's trainer ran: it names the config the dry run did not write
    assert f"config file {tmp_path}/run/config.yaml does not exist" in job.stderr, job.stderr[-2000:]


@pytest.mark.parametrize(
    ("state", "advice"),
    [
        ("PENDING", "`scancel 77`: it has not started, nothing to save"),
        ("REQUEUED", "`scancel 77`: it has not started, nothing to save"),
        ("RUNNING", "`scancel 77`: the trainer saves a checkpoint on the way out"),
        ("COMPLETING", "job 77 is ending already"),
    ],
)
def test_the_advice_on_a_queued_job_of_the_run_fits_its_state(tmp_path, state, advice):
    """The --resume refusal told to `scancel` a queued job because 'it saves a checkpoint on the way
    out', also of a PENDING job (no trainer has started: nothing to save) and a COMPLETING one (it is
    ending). Each job is now named with what ending it does in its state (a stand-in squeue)."""
    from pretrain.resume_checks import RunInQueue, check_no_live_job

    script = tmp_path / "run" / "train.sbatch"
    squeue = tmp_path / "squeue"
    squeue.write_text(f"#!/bin/sh\necho '77|{state}|{script}'\necho '78|RUNNING|{tmp_path}/other/train.sbatch'\n")
    squeue.chmod(0o755)
    with pytest.raises(RunInQueue) as err:
        check_no_live_job(script, str(squeue))
    message = str(err.value)
    assert f"job 77 ({state}) of {tmp_path / 'run'} is still in the queue" in message, message
    assert f"({advice})" in message, message
    assert "78" not in message  # another run's job
    if state != "RUNNING":
        assert "checkpoint on the way out" not in message, message


@pytest.mark.parametrize(
    "refused",
    [
        ["train.max_stepz=5"],  # the config's own check
        ["--time", "99:99:99:99"],  # an option's
        ["--sweep", "optim.lr="],  # a sweep's
    ],
)
def test_a_refusal_comes_before_torch_is_imported(refused):
    """pretrain.config imported pretrain.model.config, and with it the package pretrain.model, whose
    __init__ imported the transformer, the memory layer and torch: memlayers-submit's refusal of a
    mistyped key or --time waited for torch (`--help` 3.8 s, a refusal 4.5 s on the loaded 2-core
    machine; 0.6 and 0.8 s now). pretrain.model's names now load on first use; the reference is
    sys.modules of a fresh interpreter after the tool's refusal (and after `import pretrain.config`)."""
    done = submit_in_a_fresh_interpreter(["--config", TINY, "--dry-run", *refused])
    assert done.stdout.splitlines() == ["False", "exit 2", "[]"], done.stdout + done.stderr
    assert "memlayers-submit: error: " in done.stderr, done.stderr


def test_a_dry_run_imports_no_torch(tmp_path):
    """The dry run's plan counted the parameters on a model built on the meta device, importing torch and
    triton (4.1 / 6.9 s, first run / median of the next two, on the loaded 2-core machine; 0.7 / 0.5 s now):
    pretrain.model.accounting.config_parameters counts them from the config. The reference is the plan
    printed (exit status 0) and sys.modules of a fresh interpreter after it."""
    argv = ["--config", TINY, "--dry-run", "train.micro_batch=2", f"train.run_dir={tmp_path / 'run'}"]
    done = submit_in_a_fresh_interpreter(argv)
    assert done.stdout.splitlines()[-2:] == ["exit 0", "[]"], done.stdout[-3000:] + done.stderr
    assert "active of 3M parameters" in done.stdout + done.stderr, done.stdout[-3000:] + done.stderr


def submit_in_a_fresh_interpreter(argv: list[str]) -> subprocess.CompletedProcess:
    """memlayers-submit's main(argv) in a fresh interpreter; stdout's lines: whether `import pretrain.config`
    imported torch, ..., 'exit <status>', the heavy modules imported by then."""
    script = (
        "import sys\n"
        "import pretrain.config\n"
        "print('torch' in sys.modules)\n"
        "from tools.submit import main\n"
        "try:\n"
        "    code = main(sys.argv[1:])\n"
        "except SystemExit as e:  # argparse's refusal\n"
        "    code = e.code\n"
        "print('exit', code)\n"
        "print(sorted(m for m in ('torch', 'triton', 'deepspeed') if m in sys.modules))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script, *argv], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
