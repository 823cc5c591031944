"""The sbatch script of a run: its Slurm options (`SlurmOptions`), their checks, and the rendered
script text (`render_script`, from the templates in slurm/).

The checks refuse, before anything is written: malformed or contradictory options, an `--sbatch`
line that sets what the script sets itself (a later #SBATCH line would win, past the checks of the
job's ranks), a job array, and SBATCH_* variables of the submitting shell that sbatch would read
over the script's lines (`check_environment`). Every value inserted into the script is validated
and shell-quoted. pretrain/launch.py writes the script into the run directory and submits it.
"""

from __future__ import annotations

import os
import re
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "slurm"
LOG_DIR = "logs"  # in the run directory: one slurm-<job id>.out per job


class SubmitError(RuntimeError):
    """Submission refused or failed; the message says why and what to do."""


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


def check_environment(opts: SlurmOptions, environ) -> None:
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


def check_options(opts: SlurmOptions) -> None:
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
    check_options(opts)
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
