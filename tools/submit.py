"""Submit a pretraining run to Slurm: `memlayers-submit --config configs/tiny.yaml
train.max_steps=1000 --nodes 4 --gpus-per-node 8 --time 2-00:00:00 --partition gpu`.

Creates the run directory (resolved config, logs/, the rendered train.sbatch, optionally a
code snapshot), calls sbatch and prints the job id and the TensorBoard command.
`--dry-run` prints the script and writes nothing. `--sweep optim.lr=1e-3,3e-3 --sweep
train.seed=0,1` submits one job per combination, each in train.run_dir/<lr=1e-3_seed=0>, after
every one of them has been validated (pretrain/sweep.py). Logic lives in pretrain.launch.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.cli import ends_quietly_when_the_reader_stops, positive_int  # noqa: E402
from pretrain.launch import plan_run, submit  # noqa: E402
from pretrain.resume_checks import RunFinished, RunInQueue  # noqa: E402
from pretrain.sbatch_script import SlurmOptions, SubmitError  # noqa: E402
from pretrain.sweep import SweepError, parse_sweep, read_sweep_record, write_sweep_record  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memlayers-submit",
        description="Render an sbatch script for a training run and submit it.",
        epilog="Positional key=value arguments override config fields, e.g. train.max_steps=1000.",
    )
    p.add_argument("--config", required=True, help="YAML config, e.g. configs/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    p.add_argument("--nodes", type=positive_int, default=1, help="Slurm nodes (#SBATCH --nodes)")
    p.add_argument("--gpus-per-node", type=positive_int, default=8, help="one task per GPU")
    p.add_argument("--cpu", action="store_true", help="CPU-only variant (gloo, DS_ACCELERATOR=cpu), for testing")
    p.add_argument("--tasks-per-node", type=positive_int, default=None, help="tasks per node for --cpu (default 1)")
    p.add_argument("--cpus-per-task", type=positive_int, default=None, help="default 8 (1 with --cpu)")
    p.add_argument("--time", default="24:00:00", help="Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S")
    p.add_argument("--partition", help="Slurm partition (#SBATCH --partition; default: the cluster's)")
    p.add_argument("--account", help="Slurm account to charge (#SBATCH --account)")
    p.add_argument("--qos", help="Slurm quality of service (#SBATCH --qos)")
    p.add_argument("--constraint", help="Slurm node features required (#SBATCH --constraint), e.g. h100")
    p.add_argument(
        "--job-name",
        help="Slurm job name (default memlayers-<run dir name>); spaces allowed, not quotes, backslashes or newlines",
    )
    p.add_argument("--signal-seconds", type=positive_int, default=180, help="send USR1 this long before the time limit")
    p.add_argument(
        "--master-port",
        type=int,
        default=None,
        help="rendezvous port (default: 10000 + job id %% 20000, or the next free one on the node)",
    )
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        dest="extra_sbatch",
        help="extra sbatch option line, repeatable, e.g. --sbatch=--mem=64G",
    )
    p.add_argument("--snapshot-code", action="store_true", help="run from a copy of the code in <run_dir>/code")
    p.add_argument("--resume", action="store_true", help="resubmit an existing run directory (same resolved config)")
    p.add_argument("--workdir", type=Path, default=None, help="job working directory (default: current)")
    p.add_argument("--python", default=None, help="python executable for the job (default: this one)")
    p.add_argument("--dry-run", action="store_true", help="print the script; create nothing, submit nothing")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="repeatable: one job per combination of the values, in train.run_dir/<key=value_...>",
    )
    return p


@ends_quietly_when_the_reader_stops
def main(argv=None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after options
    opts = SlurmOptions(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task if args.cpus_per_task is not None else (1 if args.cpu else 8),
        time=args.time,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        job_name=args.job_name,
        signal_seconds=args.signal_seconds,
        master_port=args.master_port,
        extra_sbatch=args.extra_sbatch,
        cpu=args.cpu,
    )
    if args.sweep:
        return submit_sweep(args, opts)
    try:
        plan = plan_run(
            args.config,
            args.overrides,
            opts,
            workdir=args.workdir,
            python=args.python,
            snapshot=args.snapshot_code,
            resume=args.resume,
        )
        if args.dry_run:
            sys.stdout.write(plan.script)
            print("\n".join(plan.plan), file=sys.stderr)  # stdout stays the script alone
            return 0
        job_id = submit(plan)
    except SubmitError as err:
        print(f"memlayers-submit: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(plan.plan))
    print(f"submitted job {job_id}")
    print(f"run directory: {plan.run_dir}")
    print(f"log: {plan.run_dir / 'logs' / f'slurm-{job_id}.out'}")
    print(f"tensorboard --logdir {shlex.quote(str(plan.run_dir / 'tensorboard'))}")
    return 0


def submit_sweep(args, opts: SlurmOptions) -> int:
    """Plan every run of the sweep (nothing written), then submit them in order; a refusal
    stops the sweep there and says which jobs are already queued."""
    from pretrain.config import ConfigError, load_config

    workdir = Path(args.workdir or Path.cwd()).resolve()
    try:
        runs = parse_sweep(args.sweep)
        base = Path(load_config(args.config, args.overrides, base_dir=workdir).train.run_dir).resolve()
        previous = read_sweep_record(base)  # an earlier sweep's runs under the same train.run_dir stay listed
    except (SweepError, ConfigError) as err:
        print(f"memlayers-submit: error: {err}", file=sys.stderr)
        return 2
    plans = []
    skipped = []  # --resume: runs a queued job trains already, or finished ones: left as they are
    for run in runs:
        try:
            plan = plan_run(
                args.config,
                [*args.overrides, *run.overrides],
                opts,
                workdir=args.workdir,
                python=args.python,
                snapshot=args.snapshot_code,
                resume=args.resume,
                run_dir=base / run.name,  # a path: never read back as YAML
            )
        except (RunInQueue, RunFinished) as err:
            skipped.append(run)
            print(f"sweep run {run.name}: not resubmitted: {str(err).removeprefix('--resume: ')}")
            continue
        except SubmitError as err:
            print(f"memlayers-submit: error: sweep run {run.name}: {err} (nothing was submitted)", file=sys.stderr)
            return 2
        plans.append(plan)
    runs = [run for run in runs if run not in skipped]
    if not runs:
        print("every run of the sweep is queued or finished: nothing to resubmit")
        return 0
    if args.dry_run:
        for i, (run, plan) in enumerate(zip(runs, plans), 1):
            print(f"# sweep run {i}/{len(runs)}: {plan.run_dir} ({' '.join(run.overrides)})")
            sys.stdout.write(plan.script)
        return 0
    entries = []
    for run, plan in zip(runs, plans):
        entry = {"name": run.name, "run_dir": str(plan.run_dir), "overrides": list(run.overrides)}
        try:
            entry["job_id"] = submit(plan)
        except SubmitError as err:
            if not entries:  # the first job: nothing queued, nothing to record
                print(f"memlayers-submit: error: sweep run {run.name}: {err} (nothing was submitted)", file=sys.stderr)
                return 2
            queued = [e["job_id"] for e in entries]
            record = write_sweep_record(base, entries, previous)
            print(
                f"memlayers-submit: error: sweep run {run.name}: {err}. Already queued: "
                f"{len(queued)} of {len(runs)} runs (jobs {', '.join(queued) or 'none'}, listed in "
                f"{record}); the rest were not submitted",
                file=sys.stderr,
            )
            return 2
        entries.append(entry)
        print(f"submitted job {entry['job_id']}: {plan.run_dir}")
    record = write_sweep_record(base, entries, previous)
    print(f"sweep of {len(runs)} runs recorded in {record}")
    print(f"tensorboard --logdir {shlex.quote(str(base))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
