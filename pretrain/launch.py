"""Submitting training runs to Slurm: Slurm options, the rendered sbatch script, the run
directory (resolved config, optional code snapshot, log folder) and the `sbatch` call, and what
a `--resume` must pass first (the same resolved config but for RESUME_MAY_CHANGE, no job of the
run still queued, steps left to train, a learning-rate schedule that keeps the steps taken' rates).

`tools/submit.py` is the command line over this module. Every value inserted into the
script is validated and shell-quoted; `sbatch` is called with an argument list.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pretrain.config import (
    ConfigError,
    absolute_paths,
    check_runtime,
    config_differences,
    config_yaml,
    load_config,
)
from pretrain.data.errors import DataError
from pretrain.data.sources import mixture_change
from pretrain.files import atomic_directory, atomic_write
from pretrain.lr_schedule import SCHEDULE_KEYS, check_resumed_schedule

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DIR = REPO_ROOT / "slurm"
SNAPSHOT_DIRS = ("pretrain", "kernels", "tools", "configs")
CONFIG_NAME = "config.yaml"
SCRIPT_NAME = "train.sbatch"
LOG_DIR = "logs"


class SubmitError(RuntimeError):
    """Submission refused or failed; the message says why and what to do."""


class RunInQueue(SubmitError):
    """--resume of a run that a queued or running job trains already."""


class RunFinished(SubmitError):
    """--resume of a run whose latest checkpoint is at train.max_steps: nothing left to train."""


@dataclass
class SlurmOptions:
    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: int | None = None  # CPU variant only; GPU jobs run one task per GPU
    cpus_per_task: int = 8
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None
    signal_seconds: int = 180  # USR1 this long before the time limit: time to checkpoint
    master_port: int | None = None  # rendezvous port; None: the job's default or the next free one
    extra_sbatch: list[str] = field(default_factory=list)
    cpu: bool = False


# Slurm's --time forms: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (and the words below).
_TIME_FORMS = [
    (re.compile(r"^(\d+)$"), ("minutes",)),
    (re.compile(r"^(\d+):(\d+)$"), ("minutes", "seconds")),
    (re.compile(r"^(\d+):(\d+):(\d+)$"), ("hours", "minutes", "seconds")),
    (re.compile(r"^(\d+)-(\d+)$"), ("days", "hours")),
    (re.compile(r"^(\d+)-(\d+):(\d+)$"), ("days", "hours", "minutes")),
    (re.compile(r"^(\d+)-(\d+):(\d+):(\d+)$"), ("days", "hours", "minutes", "seconds")),
]
_TIME_LIMITS = {"hours": 24, "minutes": 60, "seconds": 60}


def time_limit_seconds(value: str) -> int | None:
    """Seconds in a Slurm --time string (None for UNLIMITED); SubmitError if malformed."""
    value = value.strip()
    if value.upper() in ("UNLIMITED", "INFINITE"):
        return None
    for pattern, units in _TIME_FORMS:
        m = pattern.match(value)
        if not m:
            continue
        parts = dict(zip(units, (int(x) for x in m.groups())))
        # The leading field may be as large as it likes ("90" minutes); later fields wrap.
        for unit in units[1:]:
            if parts[unit] >= _TIME_LIMITS[unit]:
                raise SubmitError(
                    f"--time {value!r}: {unit} must be below {_TIME_LIMITS[unit]} (formats: M, M:S, H:M:S, D-H, "
                    "D-H:M, D-H:M:S, e.g. --time 2-00:00:00)"
                )
        seconds = (
            parts.get("days", 0) * 86400
            + parts.get("hours", 0) * 3600
            + parts.get("minutes", 0) * 60
            + parts.get("seconds", 0)
        )
        if seconds == 0:
            raise SubmitError(f"--time {value!r} is zero: give a positive time limit, e.g. --time 04:00:00")
        return seconds
    raise SubmitError(
        f"--time {value!r} is not a Slurm time: use M, M:S, H:M:S, D-H, D-H:M or D-H:M:S (e.g. --time 04:00:00)"
    )


MAX_SIGNAL_SECONDS = 65535  # sbatch --signal=<sig>@<sig_time>: sig_time is at most 65535 seconds
_NAME = re.compile(r"^[A-Za-z0-9_.,:&|+=@-]+$")


def _directive_value(what: str, value: str) -> str:
    """A value for an #SBATCH line: sbatch reads quotes there, but not escapes or newlines."""
    if not value or any(c in value for c in "\n\r'\"\\"):
        raise SubmitError(f"{what}={value!r}: #SBATCH values must be non-empty without quotes, backslashes or newlines")
    return shlex.quote(value)


def _path_value(what: str, path: Path, suffix: str = "") -> str:
    """A path for an #SBATCH line; `suffix` may carry Slurm's %-patterns, the path may not."""
    text = str(path)
    if "%" in text:
        raise SubmitError(f"{what}={text!r} contains '%', which Slurm expands in file names: choose another path")
    return _directive_value(what, text + suffix)


# sbatch options the script sets itself, and the memlayers-submit option that sets each: an #SBATCH
# line from --sbatch comes later in the script and would win (sbatch takes the last), so that, for
# example, --sbatch=--ntasks-per-node=2 ran a job of 2 ranks whose config was checked for 1.
_TEMPLATE_OPTIONS = {
    "--nodes": "use --nodes",
    "-N": "use --nodes",
    "--ntasks-per-node": "use --gpus-per-node (--tasks-per-node with --cpu)",
    "--ntasks": "use --nodes and --gpus-per-node (--tasks-per-node with --cpu)",
    "-n": "use --nodes and --gpus-per-node (--tasks-per-node with --cpu)",
    "--gpus-per-node": "use --gpus-per-node",
    "--gpus": "use --nodes and --gpus-per-node",
    "-G": "use --nodes and --gpus-per-node",
    "--gpus-per-task": "use --gpus-per-node (one task per GPU)",
    "--gpus-per-socket": "use --gpus-per-node",
    "--cpus-per-gpu": "use --cpus-per-task",
    "--cpus-per-task": "use --cpus-per-task",
    "-c": "use --cpus-per-task",
    "--time": "use --time",
    "-t": "use --time",
    "--signal": "use --signal-seconds",
    "--requeue": "drop it (the script sets it)",
    "--no-requeue": "drop it (stopped runs requeue themselves; SIGTERM, scancel, ends a run without a requeue)",
    "--open-mode": "drop it (requeued runs append to one log)",
    "--output": "drop it (the log is <run_dir>/logs/slurm-<job id>.out)",
    "-o": "drop it (the log is <run_dir>/logs/slurm-<job id>.out)",
    "--chdir": "use --workdir",
    "-D": "use --workdir",
    "--job-name": "use --job-name",
    "-J": "use --job-name",
    "--partition": "use --partition",
    "-p": "use --partition",
    "--account": "use --account",
    "-A": "use --account",
    "--qos": "use --qos",
    "-q": "use --qos",
    "--constraint": "use --constraint",
    "-C": "use --constraint",
}


# A job array runs its script once per task: every task would train the same run directory, writing
# the same checkpoints over each other.
_ONE_RUN_OPTIONS = {
    "--array": "use --sweep KEY=V1,V2 for several runs (one job and run directory each)",
    "-a": "use --sweep KEY=V1,V2 for several runs (one job and run directory each)",
}


def _template_option(token: str, options: dict[str, str] = _TEMPLATE_OPTIONS) -> str | None:
    """The option of `options` that an sbatch argument sets (sbatch also takes a unique
    prefix of a long option, `--ntasks-per=2`), or None."""
    if token.startswith("--"):
        name = token.split("=", 1)[0]
        if name in options:
            return name
        matches = [o for o in options if o.startswith("--") and len(name) > 3 and o.startswith(name)]
        # a prefix of several (--cpus-per: -task or -gpu) is one sbatch refuses as ambiguous: refused here
        # too, before anything is written, naming the first (their fixes agree)
        return matches[0] if matches else None
    if token.startswith("-") and len(token) >= 2:
        return token[:2] if token[:2] in options else None
    return None


# Options whose value may ask for GPUs (or CPUs) beside other resources: `--gres=gpu:8` (as
# `--gres=gpu:a100:8` or among others, `--gres=nvme:1,gpu:2`) also sets the GPUs per node past
# --gpus-per-node, while `--gres=nvme:1` is the site's business. `--tres-per-task` (Slurm 23.11+)
# takes `gres/gpu=1` for --gpus-per-task and `cpu=4` for --cpus-per-task.
_RESOURCE_LISTS = {
    "--gres": "use --gpus-per-node (the script requests the GPUs per node)",
    "--tres-per-task": "use --gpus-per-node (one task per GPU) and --cpus-per-task",
}


def _resource_list_option(tokens: list[str], i: int) -> str | None:
    """The option of `_RESOURCE_LISTS` that `tokens[i]` (with its value, there or in the next token)
    uses to ask for GPUs or CPUs, or None."""
    name, has_value, value = tokens[i].partition("=")
    if not has_value:
        value = tokens[i + 1] if i + 1 < len(tokens) else ""
    if name == "--gres" or (name.startswith("--tres-p") and "--tres-per-task".startswith(name)):
        option = "--gres" if name == "--gres" else "--tres-per-task"
        for entry in value.lower().split(","):
            resource = re.split(r"[:=]", entry, maxsplit=1)[0]
            if resource in ("gpu", "gres/gpu", "gres:gpu") or (option == "--tres-per-task" and resource == "cpu"):
                return option
    return None


# sbatch's input environment variables for the options the script sets: sbatch reads them over
# the script's #SBATCH lines ("environment variables will override any options set in a batch
# script"), so SBATCH_TIMELIMIT=5 in the submitting shell ran a 5-minute job whose --signal-seconds
# were checked against --time. The site's options (partition, ...) conflict only when given here.
_ENV_OPTIONS = {
    "SBATCH_TIMELIMIT": "--time",
    "SBATCH_SIGNAL": "--signal",
    "SBATCH_REQUEUE": "--requeue",
    "SBATCH_NO_REQUEUE": "--no-requeue",
    "SBATCH_OPEN_MODE": "--open-mode",
    "SBATCH_OUTPUT": "--output",
    "SBATCH_JOB_NAME": "--job-name",
    "SBATCH_GPUS": "--gpus",
    "SBATCH_GPUS_PER_NODE": "--gpus-per-node",
    "SBATCH_GPUS_PER_TASK": "--gpus-per-task",
    "SBATCH_CPUS_PER_GPU": "--cpus-per-gpu",
}
_ENV_SITE_OPTIONS = {
    "SBATCH_PARTITION": "partition",
    "SBATCH_ACCOUNT": "account",
    "SBATCH_QOS": "qos",
    "SBATCH_CONSTRAINT": "constraint",
}
_ENV_FLAGS = ("SBATCH_REQUEUE", "SBATCH_NO_REQUEUE")  # set by "", "yes" or a non-zero number only


def _check_environment(opts: SlurmOptions, environ) -> None:
    """Refuse (SubmitError) an SBATCH_* variable of the submitting shell that sbatch would read
    over a line the script sets, naming it and the option to use."""
    for var, option in _ENV_OPTIONS.items():
        value = environ.get(var)
        if value is None:
            continue
        if var in _ENV_FLAGS and not (value in ("", "yes") or (value.isdigit() and int(value) != 0)):
            continue
        fix = _TEMPLATE_OPTIONS[option]
        fix = f"unset {var} and {fix} instead" if fix.startswith("use ") else f"unset {var}: {fix}"
        raise SubmitError(
            f"{var}={value!r} in the environment: sbatch reads it over the script's own {option} setting (past "
            f"the checks of the job's ranks and run directory): {fix}"
        )
    gres = environ.get("SBATCH_GRES")
    if gres is not None and _resource_list_option(["--gres", gres], 0) is not None:
        raise SubmitError(
            f"SBATCH_GRES={gres!r} in the environment asks for GPUs, which sbatch reads over the script's own "
            f"--gpus-per-node line: unset SBATCH_GRES (use --gpus-per-node)"
        )
    for var, name in _ENV_SITE_OPTIONS.items():
        if environ.get(var) is not None and getattr(opts, name) is not None:
            raise SubmitError(
                f"{var}={environ[var]!r} in the environment would override --{name}={getattr(opts, name)} (sbatch "
                f"reads it over the script's line): unset {var}, or drop --{name} to use it"
            )


def _check_options(opts: SlurmOptions) -> None:
    for name in ("nodes", "gpus_per_node", "cpus_per_task", "signal_seconds"):
        value = getattr(opts, name)
        if not isinstance(value, int) or value < (0 if name == "gpus_per_node" else 1):
            raise SubmitError(f"--{name.replace('_', '-')}={value!r} must be a positive integer")
    if opts.cpu:
        if opts.tasks_per_node is not None and opts.tasks_per_node < 1:
            raise SubmitError(f"--tasks-per-node={opts.tasks_per_node} must be a positive integer")
    else:
        if opts.gpus_per_node < 1:
            raise SubmitError("--gpus-per-node must be >= 1 for a GPU job (use --cpu for a CPU-only job)")
        if opts.tasks_per_node not in (None, opts.gpus_per_node):
            raise SubmitError(
                f"--tasks-per-node={opts.tasks_per_node} differs from --gpus-per-node={opts.gpus_per_node}: "
                "GPU jobs run one task per GPU (drop --tasks-per-node)"
            )
    if opts.signal_seconds > MAX_SIGNAL_SECONDS:
        raise SubmitError(
            f"--signal-seconds={opts.signal_seconds} exceeds {MAX_SIGNAL_SECONDS}, the most Slurm's --signal accepts: "
            "give the time a checkpoint needs (the default is 180)"
        )
    if opts.master_port is not None and not (isinstance(opts.master_port, int) and 1024 <= opts.master_port <= 65535):
        raise SubmitError(f"--master-port={opts.master_port!r} must be a port number in 1024..65535")
    limit = time_limit_seconds(opts.time)
    if limit is not None and opts.signal_seconds >= limit:
        raise SubmitError(
            f"--signal-seconds={opts.signal_seconds} is not shorter than --time {opts.time} ({limit} s): "
            "the stop signal would come before the job starts working"
        )
    for name in ("partition", "account", "qos", "constraint"):
        value = getattr(opts, name)
        if value is not None and not _NAME.match(value):
            raise SubmitError(f"--{name.replace('_', '-')}={value!r} has characters Slurm does not accept there")
    if opts.job_name is not None:  # any text sbatch reads back whole from a quoted #SBATCH value, spaces too
        _directive_value("--job-name", opts.job_name)
    for line in opts.extra_sbatch:
        if not line.startswith("-") or "\n" in line or "\r" in line:
            raise SubmitError(f"--sbatch {line!r} must be one sbatch option such as --mem=64G or --exclusive")
        try:
            tokens = shlex.split(line)
        except ValueError as err:  # shlex: "No closing quotation", "No escaped character"
            raise SubmitError(
                f"--sbatch {line!r} cannot be split into words ({err}): close its quotes, or drop them "
                "(#SBATCH values take no quotes)"
            ) from None
        for i, token in enumerate(tokens):  # tokens[0] is an option: the line starts with "-"
            if not token.startswith("-") and ("=" in tokens[i - 1] or not tokens[i - 1].startswith("-")):
                # not the value of an option given as `--mem 4G`: sbatch reads it as a directive of its own.
                # The example quotes the words after the option they follow (`--opt=a b` or `--opt a b`).
                start = max(j for j in range(i) if tokens[j].startswith("-"))
                name, eq, first = tokens[start].partition("=")
                end = next((j for j in range(i, len(tokens)) if tokens[j].startswith("-")), len(tokens))
                example = " ".join([first] * bool(eq) + tokens[start + 1 : end])
                raise SubmitError(
                    f"--sbatch {line!r}: {token!r} is a word of its own after {tokens[i - 1]}: "
                    f"quote the value, e.g. --sbatch=\"{name}='{example}'\""
                )
            name = _template_option(token)
            if name is not None:
                raise SubmitError(
                    f"--sbatch {line!r} sets {name}, which the script sets itself (a later #SBATCH line would "
                    f"override it, past the checks of the job's ranks and run directory): {_TEMPLATE_OPTIONS[name]}"
                )
            name = _template_option(token, _ONE_RUN_OPTIONS)
            if name is not None:
                raise SubmitError(
                    f"--sbatch {line!r} sets {name}: each array task would train the same run directory, "
                    f"overwriting the others' checkpoints: {_ONE_RUN_OPTIONS[name]}"
                )
            name = _resource_list_option(tokens, i)
            if name is not None:
                raise SubmitError(
                    f"--sbatch {line!r} asks for GPUs or CPUs through {name}, which the script requests itself "
                    f"(--gpus-per-node, --cpus-per-task: the job would get another count than its ranks were "
                    f"checked for): {_RESOURCE_LISTS[name]}"
                )


def world_size(opts: SlurmOptions) -> int:
    """Ranks in the job: one task per GPU, or --tasks-per-node tasks per node on CPU."""
    return opts.nodes * tasks_per_node(opts)


def tasks_per_node(opts: SlurmOptions) -> int:
    if opts.cpu:
        return opts.tasks_per_node or 1
    return opts.gpus_per_node


class _SbatchTemplate(string.Template):
    delimiter = "@"  # "$" belongs to the shell in these scripts


def render_script(
    opts: SlurmOptions,
    run_dir: Path,
    config_path: Path,
    workdir: Path,
    code_dir: Path,
    python: str,
    snapshot: bool,
    template_dir: Path = TEMPLATE_DIR,
) -> str:
    """The sbatch script text for these options; paths should be absolute."""
    _check_options(opts)
    if os.pathsep in str(code_dir):  # PYTHONPATH has no escape for its separator
        what = "train.run_dir" if snapshot else "the code checkout"
        raise SubmitError(
            f"{what}: the job imports the code from {code_dir}, whose ':' PYTHONPATH reads as a separator, so "
            "the job would import other code (an installed copy) or none: "
            + ("choose a train.run_dir without ':' or drop --snapshot-code" if snapshot else "move the checkout")
        )
    template_file = template_dir / ("train_cpu.sbatch" if opts.cpu else "train_gpu.sbatch")
    site = []
    for name in ("partition", "account", "qos", "constraint"):
        value = getattr(opts, name)
        if value is not None:
            site.append(f"#SBATCH --{name}={shlex.quote(value)}")
    for line in opts.extra_sbatch:
        site.append("#SBATCH " + " ".join(_directive_value("--sbatch", tok) for tok in shlex.split(line)))
    # %j: Slurm's job id, so every job (and its requeued runs, appended) has its own log. Checked before
    # the job name, which is derived from the run directory unless --job-name is given.
    log_path = _path_value("train.run_dir", run_dir, suffix=f"/{LOG_DIR}/slurm-%j.out")
    values = {
        "job_name": _directive_value("--job-name", opts.job_name or f"memlayers-{run_dir.name}"),
        "nodes": str(opts.nodes),
        "tasks_per_node": str(tasks_per_node(opts)),
        "gpus_per_node": str(opts.gpus_per_node),
        "cpus_per_task": str(opts.cpus_per_task),
        "time": opts.time.strip(),
        "signal": f"USR1@{opts.signal_seconds}",
        "log_path": log_path,
        "workdir": _path_value("working directory", workdir),
        "site_options": "\n".join(site),
        "master_port": f"MASTER_PORT={opts.master_port}" if opts.master_port is not None else "",
        "code_dir": shlex.quote(str(code_dir)),
        "python": shlex.quote(python),
        "config_path": shlex.quote(str(config_path)),
    }
    text = template_file.read_text()
    for key, value in values.items():
        if value == "":
            text = text.replace(f"@{{{key}}}\n", "")
    return _SbatchTemplate(text).substitute(values)


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
    _check_options(opts)
    _check_environment(opts, os.environ)
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
        raise SubmitError(f"config {config} on {world_size(opts)} ranks: {err}") from None
    run_dir = (workdir / (run_dir if run_dir is not None else cfg.train.run_dir)).resolve()
    cfg.train.run_dir = str(run_dir)
    config_text = config_yaml(cfg)
    config_path = run_dir / CONFIG_NAME
    code_dir = run_dir / "code" if snapshot else REPO_ROOT
    script = render_script(opts, run_dir, config_path, workdir, code_dir, python, snapshot)
    _check_run_dir(run_dir, config_path, config_text, resume, workdir)
    if resume:
        _check_no_live_job(run_dir / SCRIPT_NAME)
        _check_schedule_change(run_dir, cfg)
        _check_not_finished(run_dir, cfg)
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


# What a resubmitted run may change: how its data is read (the trainer re-plans the data
# position for them, pretrain.resharding), how a hang is handled (pretrain/watchdog.py), and
# the learning-rate schedule where the steps already taken keep their rates (an extended
# warmup-stable-decay run; pretrain/lr_schedule.py, checked below and again by the trainer).
# The training data may change too (`mixture_change`: sources added, removed or reweighted),
# and how the model runs where the checkpoint does not depend on it (what lowers the memory per
# rank, pretrain/out_of_memory.py). The world size is not in the config at all.
RESUME_MAY_CHANGE = (
    # how often the run logs, evaluates and checkpoints, and where it stops: no saved state
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.probe_limit",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.stop_after",
    "slots.log_every",
    "train.micro_batch",
    "data.num_workers",
    "data.shuffle_buffer",
    "train.hang_timeout_s",
    "train.startup_timeout_s",
    "train.rendezvous_timeout_s",
    "train.requeue_on_hang",
    *SCHEDULE_KEYS,
    "optim.allow_schedule_change",
    "train.init_from",  # read only by a run's start, never by a resume
    # pretrain.config.MODEL_RUNTIME_KEYS, which checkpoint.check_compatible ignores: the same math
    # (kernel, document_attention), value shards re-split on load (parallel_size)
    "model.memory.kernel",
    "model.memory.parallel_size",
    "model.document_attention",
    "train.activation_checkpointing",  # recomputation only: no state
    "train.activation_checkpointing_layers",
)


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


def _check_no_live_job(script_path: Path, squeue_bin: str = "squeue") -> None:
    """Refuse a --resume while a job of this run (its train.sbatch) is still queued, running or
    requeued: two jobs would train the same run directory at once, each pruning and overwriting
    the other's checkpoints. Where squeue is absent (no Slurm here: --dry-run) this goes on
    silently, where it fails with a warning; sbatch itself then fails with its own message."""
    exe = shutil.which(squeue_bin)
    if exe is None:
        return
    result = subprocess.run(
        [exe, "--me", "--noheader", "--format=%i|%T|%o"], capture_output=True, text=True, timeout=120, check=False
    )
    if result.returncode != 0:
        message = result.stderr.strip() or "(no output)"
        print(
            f"memlayers-submit: warning: could not check for a job of {script_path.parent} still in the queue "
            f"(`squeue` exit {result.returncode}: {message})",
            file=sys.stderr,
        )
        return
    live = []
    for line in result.stdout.splitlines():
        job_id, _, rest = line.partition("|")
        state, _, command = rest.partition("|")  # the command (the script's path) may itself hold '|'
        if command == str(script_path):
            live.append((job_id, state))
    if live:
        raise RunInQueue(
            f"--resume: job {', '.join(f'{job} ({state})' for job, state in live)} of {script_path.parent} is still "
            "in the queue; a second job would train the same run directory at the same time, each pruning and "
            "overwriting the other's checkpoints. Wait for it to end, or end it first "
            f"({'; '.join(_how_to_end(job, state) for job, state in live)}) and resubmit once squeue no longer lists it"
        )


# squeue states (%T) of a job whose batch script has not started: no trainer, nothing to save
_NOT_STARTED = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING"})


def _how_to_end(job_id: str, state: str) -> str:
    """How to end a queued job of the run, and what that costs, as true for its squeue state."""
    if state == "RUNNING":
        return f"`scancel {job_id}`: the trainer saves a checkpoint on the way out"
    if state in _NOT_STARTED:
        return f"`scancel {job_id}`: it has not started, nothing to save"
    if state == "COMPLETING":
        return f"job {job_id} is ending already"
    return f"`scancel {job_id}`"


def _check_not_finished(run_dir: Path, cfg) -> None:
    """A run whose latest checkpoint is at train.max_steps has nothing left to train: its job would
    wait in the queue, load the checkpoint and end. Refuse it, naming how to extend the run."""
    from pretrain.checkpoint import CheckpointError, latest_checkpoint, step_of

    try:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
    except CheckpointError as err:
        raise SubmitError(f"--resume: {err}") from None
    step = step_of(checkpoint) if checkpoint is not None else None
    if step is not None and step >= cfg.train.max_steps:
        raise RunFinished(
            f"--resume: {run_dir} is finished: its latest checkpoint {checkpoint.name} is at step {step} and "
            f"train.max_steps={cfg.train.max_steps}, so the job would have nothing to train; raise "
            "train.max_steps to extend the run, or choose a new train.run_dir"
        )


def _check_schedule_change(run_dir: Path, cfg) -> None:
    """Refuse now, not after the queue, a schedule that gives the steps the latest checkpoint
    took other learning rates (the trainer would refuse it at start)."""
    from pretrain.checkpoint import CheckpointError, latest_checkpoint, step_of
    from pretrain.export.errors import ExportError
    from pretrain.export.source import load_run_config

    try:
        checkpoint = latest_checkpoint(run_dir / "checkpoints")
        if checkpoint is None or step_of(checkpoint) is None:
            return
        saved = load_run_config(checkpoint / CONFIG_NAME)
        check_resumed_schedule(saved, cfg, step_of(checkpoint), checkpoint.name)
    except (CheckpointError, ExportError, ConfigError) as err:
        raise SubmitError(f"--resume: {err}") from None


def _check_run_dir(run_dir: Path, config_path: Path, config_text: str, resume: bool, workdir: Path) -> None:
    """A new run needs an absent or empty run dir; --resume needs this tool's run dir with the
    same resolved config, but for RESUME_MAY_CHANGE. Relative paths in a config saved before
    they were saved absolute are read against `workdir`."""
    if run_dir.exists():
        if not run_dir.is_dir():
            raise SubmitError(f"train.run_dir={run_dir} exists and is not a directory: choose another train.run_dir")
        existing = config_path.read_text() if config_path.is_file() else None
        if resume:
            if existing is None:
                raise SubmitError(
                    f"--resume: {run_dir} holds no {CONFIG_NAME}, so it is not a run directory made by this tool"
                )
            old = OmegaConf.to_container(absolute_paths(OmegaConf.create(existing), workdir))
            new = OmegaConf.to_container(OmegaConf.create(config_text))
            changed = set(config_differences(old, new)) - set(RESUME_MAY_CHANGE)
            try:
                data_change = mixture_change(old["data"], new["data"])
            except DataError as err:
                raise SubmitError(f"--resume: {err}") from None
            if data_change:  # e.g. an annealing mixture for the decay
                changed -= {"data.sources", "data.dir"}
            from pretrain.checkpoint import ZERO_STAGES_INTERCHANGEABLE

            if {old["train"].get("zero_stage"), new["train"]["zero_stage"]} <= ZERO_STAGES_INTERCHANGEABLE:
                changed.discard("train.zero_stage")
            changed = sorted(changed)
            if changed:
                paths = [k for k in changed if k in ("data.dir", "data.cache_dir", "data.sources", "data.eval_sources")]
                where = f"; relative paths are read in the working directory {workdir}: pass the run's --workdir"
                raise SubmitError(
                    f"--resume: the resolved config differs from {config_path} in {', '.join(changed)} (a different "
                    f"run): resubmit with the same config and overrides (only {', '.join(RESUME_MAY_CHANGE)} may "
                    "change, and train.zero_stage between 1 and 2), or choose a new train.run_dir"
                    + (where if paths else "")
                )
        elif any(run_dir.iterdir()):
            raise SubmitError(
                f"train.run_dir={run_dir} already exists and is not empty (another run's directory): pass --resume "
                "to continue that run with the same config, or set train.run_dir=<new path>"
            )
    elif resume:
        raise SubmitError(f"--resume: {run_dir} does not exist: submit without --resume to start this run")


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
            plan.code_dir.rename(previous)
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
        plan.replaced_code.rename(plan.code_dir)
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
        raise SubmitError(f"sbatch refused the job (exit {result.returncode}): {message}")
    # --parsable prints "<jobid>" or "<jobid>;<cluster>".
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SubmitError(f"sbatch printed {result.stdout.strip()!r}, not a job id")
    return job_id


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
