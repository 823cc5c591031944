"""Submitting a training run to Slurm: `plan_run` checks everything and renders the script,
touching nothing on disk; `submit` writes the run directory (resolved config, optional code
snapshot, log folder, script) and calls `sbatch` with an argument list, leaving nothing
half-created on a failure.

The script and its Slurm options are pretrain/sbatch_script.py's; what a new run or a `--resume`
must pass first, pretrain/resume_checks.py's. `tools/submit.py` is the command line over this module.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.config import ConfigError, check_runtime, config_yaml, load_config
from pretrain.data.errors import DataError
from pretrain.files import atomic_directory, atomic_write, rename_on_disk
from pretrain.resume_checks import (
    CONFIG_NAME,
    check_no_live_job,
    check_not_finished,
    check_run_dir,
    check_schedule_change,
)
from pretrain.sbatch_script import (
    LOG_DIR,
    SlurmOptions,
    SubmitError,
    check_environment,
    check_options,
    render_script,
    world_size,
)
from pretrain.words import counted

REPO_ROOT = Path(__file__).resolve().parent.parent
SNAPSHOT_DIRS = ("pretrain", "kernels", "tools", "configs")
SCRIPT_NAME = "train.sbatch"


@dataclass
class PreparedRun:
    run_dir: Path
    config_path: Path
    script_path: Path
    script: str
    config_text: str
    code_dir: Path
    created_dir: bool = False  # run_dir did not exist before
    created_top: Path | None = None  # the outermost folder materialise() created: run_dir or a parent
    created_paths: list[Path] = field(default_factory=list)
    replaced_code: Path | None = None  # previous snapshot kept until the submission succeeds
    replaced_config: str | None = None  # the run's config before a --resume changed it, for rollback
    plan: list[str] = field(default_factory=list)  # what the run will do (pretrain/run_plan.py), log lines


def plan_run(
    config: str | Path,
    overrides: list[str],
    opts: SlurmOptions,
    *,
    workdir: Path | None = None,
    python: str | None = None,
    snapshot: bool = False,
    resume: bool = False,
    run_dir: Path | None = None,
) -> PreparedRun:
    """Validate everything and render the script, touching nothing on disk. `run_dir`: the run
    directory in place of train.run_dir (a sweep's runs), taken as a path, not an override."""
    workdir = Path(workdir or Path.cwd()).resolve()
    python = python or sys.executable
    check_options(opts)
    check_environment(opts, os.environ)
    if snapshot and sys.version_info < (3, 11):
        raise SubmitError("--snapshot-code needs Python >= 3.11 (PYTHONSAFEPATH) in the job's environment")
    if sys.version_info < (3, 11) and workdir != REPO_ROOT:
        # PYTHONSAFEPATH (the script's) is 3.11's: before it, `python -m` imports the working directory's own
        shadows = [name for name in SNAPSHOT_DIRS if (workdir / name / "__init__.py").is_file()]
        if shadows:
            raise SubmitError(
                f"the working directory {workdir} holds {', '.join(shadows)}/ (another checkout?), which the job "
                f"would import instead of {REPO_ROOT} on this Python ({sys.version.split()[0]}, no PYTHONSAFEPATH): "
                "submit from that checkout's own tools/submit.py, or pass another --workdir"
            )
    try:
        # The job starts in `workdir`: relative paths mean paths there, checked and saved as such.
        cfg = load_config(config, overrides, base_dir=workdir)
        # What the job itself would refuse at start-up (batch vs world size, memory-parallel
        # size, fp16 on CPU) is refused now, not after hours in the queue.
        check_runtime(cfg, world_size=world_size(opts), device_type="cpu" if opts.cpu else "cuda")
    except ConfigError as err:
        raise SubmitError(f"config {config} on {counted(world_size(opts), 'rank')}: {err}") from None
    run_dir = (workdir / (run_dir if run_dir is not None else cfg.train.run_dir)).resolve()
    cfg.train.run_dir = str(run_dir)
    config_text = config_yaml(cfg)
    config_path = run_dir / CONFIG_NAME
    code_dir = run_dir / "code" if snapshot else REPO_ROOT
    script = render_script(opts, run_dir, config_path, workdir, code_dir, python, snapshot)
    check_run_dir(run_dir, config_path, config_text, resume, workdir)
    if resume:
        check_no_live_job(run_dir / SCRIPT_NAME)
        check_schedule_change(run_dir, cfg)
        check_not_finished(run_dir, cfg)
    elif cfg.train.init_from:
        _check_init_from(cfg)
    return PreparedRun(
        run_dir=run_dir,
        config_path=config_path,
        script_path=run_dir / SCRIPT_NAME,
        script=script,
        config_text=config_text,
        code_dir=code_dir,
        plan=_plan_lines(cfg),
    )


def _plan_lines(cfg) -> list[str]:
    """The run's tokens, epochs per prepared source, parameters and FLOPs (pretrain/run_plan.py)."""
    from pretrain.data.sources import resolve_sources
    from pretrain.run_plan import describe_plan, training_plan

    try:
        sources = resolve_sources(cfg.data, cfg.data.seq_len)  # [] for the embedded corpus: built by the job
    except DataError as err:
        raise SubmitError(str(err)) from None
    return describe_plan(training_plan(cfg, sources))


def _check_init_from(cfg) -> None:
    """The export a new run starts from fits the model and the data's tokenizer (the trainer
    checks again at start; this saves a wait in the queue)."""
    from pretrain.data.sources import resolve_sources
    from pretrain.files import file_sha256
    from pretrain.init_from import check_init_source

    try:
        sources = resolve_sources(cfg.data, cfg.data.seq_len)
        tokenizer = sources[0].dir / "tokenizer.model" if sources else None
        sha = file_sha256(tokenizer) if tokenizer is not None and tokenizer.is_file() else None
        check_init_source(cfg, sha, sources[0].dir if sources else None)
    except (ConfigError, DataError) as err:
        raise SubmitError(str(err)) from None


def _copy_code(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", ".*")
    with atomic_directory(dest) as tmp:
        for name in SNAPSHOT_DIRS:
            src = REPO_ROOT / name
            if src.is_dir():
                shutil.copytree(src, tmp / name, ignore=ignore)


def materialise(plan: PreparedRun) -> None:
    """Create the run directory, resolved config, log folder, code snapshot and script."""
    if not plan.run_dir.exists():
        top = plan.run_dir
        while not top.parent.exists():
            top = top.parent
        plan.run_dir.mkdir(parents=True)
        plan.created_dir, plan.created_top = True, top
    logs = plan.run_dir / LOG_DIR
    if not logs.exists():
        logs.mkdir()
        plan.created_paths.append(logs)
    if not plan.config_path.exists():
        plan.created_paths.append(plan.config_path)
    elif plan.config_path.read_text() != plan.config_text:
        plan.replaced_config = plan.config_path.read_text()
    atomic_write(plan.config_path, plan.config_text)
    if plan.code_dir != REPO_ROOT:
        if plan.code_dir.exists():
            previous = plan.code_dir.with_name("code.previous")
            if previous.exists():  # left by a submission interrupted before it ended: nothing runs from it
                shutil.rmtree(previous)
            rename_on_disk(plan.code_dir, previous)
            plan.replaced_code = previous
        plan.created_paths.append(plan.code_dir)
        _copy_code(plan.code_dir)
    if not plan.script_path.exists():
        plan.created_paths.append(plan.script_path)
    atomic_write(plan.script_path, plan.script)


def rollback(plan: PreparedRun) -> None:
    """Remove what materialise() created (all of it for a new run directory)."""
    if plan.created_dir:
        shutil.rmtree(plan.created_top or plan.run_dir, ignore_errors=True)
        return
    for path in reversed(plan.created_paths):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if plan.replaced_code is not None and plan.replaced_code.exists():
        # on disk before the command returns: a job queued earlier runs from code/ (PYTHONSAFEPATH)
        rename_on_disk(plan.replaced_code, plan.code_dir)
    if plan.replaced_config is not None:
        atomic_write(plan.config_path, plan.replaced_config)


def commit(plan: PreparedRun) -> None:
    if plan.replaced_code is not None:
        shutil.rmtree(plan.replaced_code, ignore_errors=True)


def sbatch(script_path: Path, sbatch_bin: str = "sbatch") -> str:
    """Submit a script; return the job id. SubmitError carries sbatch's own message."""
    exe = shutil.which(sbatch_bin)
    if exe is None:
        raise SubmitError(
            f"sbatch not found on PATH ({sbatch_bin!r}): run on a Slurm login node, or use --dry-run to see the script"
        )
    result = subprocess.run(
        [exe, "--parsable", str(script_path)], capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        message = result.stderr.strip() or result.stdout.strip() or "(no output)"
        raise SubmitError(f"sbatch refused the job (exit {result.returncode}): {message}{_sbatch_hint(message)}")
    # --parsable prints "<jobid>" or "<jobid>;<cluster>".
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed {result.stdout.strip()!r}, not a job id")
    return job_id


# sbatch's words where the machine is no part of a working cluster (Slurm 22.05), and what they mean
_NO_CLUSTER_HINTS = (
    (
        "could not establish a configuration source",
        "sbatch finds no Slurm configuration on this machine (no slurm.conf, SLURM_CONF unset, no DNS SRV "
        "record for slurmctld): submit from a login node of the cluster, or pass --dry-run to see the job script",
    ),
    (
        "unable to contact slurm controller",
        "the cluster's controller (slurmctld) does not answer: `scontrol ping` says whether it is up",
    ),
)


def _sbatch_hint(message: str) -> str:
    """What sbatch's own words mean, where they are those of a machine outside a working cluster."""
    lowered = message.lower()
    return "".join(f"\n({hint})" for words, hint in _NO_CLUSTER_HINTS if words in lowered)


def submit(plan: PreparedRun, sbatch_bin: str = "sbatch") -> str:
    """Write the run directory and submit; on any failure leave nothing half-created."""
    try:
        materialise(plan)
        job_id = sbatch(plan.script_path, sbatch_bin)
    except BaseException as err:
        try:
            rollback(plan)
        except OSError as problem:  # say both: the first error is why, the second what is left
            raise SubmitError(f"{err} (and putting {plan.run_dir} back failed: {problem}; check it by hand)") from err
        raise
    commit(plan)
    return job_id
