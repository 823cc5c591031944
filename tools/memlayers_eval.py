"""Evaluate an export with lm-evaluation-harness: write the fact-probe tasks, then run lm_eval.

  memlayers-eval EXPORT_DIR                       # memlayers_facts + memlayers_facts_mc, offline
  memlayers-eval EXPORT_DIR --new-facts           # the same on the facts held out of pretraining
  memlayers-eval EXPORT_DIR --write-tasks DIR     # only write the task folder (for a plain lm_eval run)
  memlayers-eval EXPORT_DIR --tasks triviaqa,nq_open --online   # hub tasks, on a machine that can fetch

A thin wrapper: it prints and runs the plain command
  lm_eval --model hf --model_args pretrained=EXPORT_DIR,trust_remote_code=True \
          --tasks memlayers_facts,memlayers_facts_mc --include_path TASK_DIR ...
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pretrain.cli import positive_int, torch_device  # noqa: E402


def lm_eval_command(
    export_dir: Path,
    tasks: str,
    task_dir: Path | None,
    batch_size: str,
    device: str,
    output: Path | None,
    limit: int | None,
) -> list[str]:
    script = Path(sys.executable).parent / "lm_eval"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "lm_eval"]
    cmd += [
        "--model",
        "hf",
        "--model_args",
        f"pretrained={export_dir},trust_remote_code=True",
        "--tasks",
        tasks,
        "--batch_size",
        batch_size,
        "--device",
        device,
    ]
    if task_dir is not None:
        cmd += ["--include_path", str(task_dir)]
    if output is not None:
        cmd += ["--output_path", str(output)]
    if limit:
        cmd += ["--limit", str(limit)]
    return cmd


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export_dir", help="a folder written by tools/export.py")
    parser.add_argument(
        "--tasks",
        default="memlayers_facts,memlayers_facts_mc",
        help="comma-separated lm_eval tasks (default: the fact-probe tasks memlayers_facts,memlayers_facts_mc)",
    )
    parser.add_argument(
        "--write-tasks", metavar="DIR", default=None, help="write the fact-probe task folder to DIR and stop"
    )
    parser.add_argument(
        "--task-dir",
        default=None,
        help="a task folder to pass to lm_eval: one --write-tasks wrote, or your own task YAMLs (only fact tasks are checked)",
    )
    parser.add_argument("--probes-dir", default=None, help="folder with probes.jsonl (default: the export)")
    parser.add_argument("--probes", type=positive_int, default=None, help="only the first N probes (N >= 1)")
    parser.add_argument(
        "--new-facts",
        action="store_true",
        help="ask the new facts (held out of pretraining) instead of the trained ones the run's fact recall asks",
    )
    parser.add_argument("--batch-size", default="8", help="lm_eval --batch_size: a number, or auto")
    parser.add_argument(
        "--device", type=torch_device, default="cpu", help="torch device for lm_eval's model, e.g. cpu, cuda, cuda:1"
    )
    parser.add_argument("--output", default=None, help="lm_eval --output_path")
    parser.add_argument("--limit", type=positive_int, default=None, help="lm_eval --limit (examples per task, N >= 1)")
    parser.add_argument("--online", action="store_true", help="allow hub downloads (standard tasks)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """The options; the probe options (--probes-dir, --probes, --new-facts) refused where they would
    choose nothing: beside --task-dir, or with no fact task in --tasks and no --write-tasks."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = (("--probes-dir", args.probes_dir), ("--probes", args.probes), ("--new-facts", args.new_facts))
    chosen = [o for o, value in given if value]
    if args.task_dir and chosen:  # they choose the probes of the tasks written here, not of a written folder
        parser.error(f"{', '.join(chosen)} and --task-dir: the folder's tasks are asked as written; drop --task-dir")
    fact_tasks = [t for t in args.tasks.split(",") if t.strip().startswith("memlayers_facts")]
    if chosen and not fact_tasks and not args.write_tasks:  # no fact task is written: they would choose nothing
        parser.error(
            f"{', '.join(chosen)} choose the probes of the fact tasks (memlayers_facts, memlayers_facts_mc), "
            f"and --tasks {args.tasks} has neither: add one to --tasks or drop {', '.join(chosen)}"
        )
    return args


def _explain_failure(status: int, args: argparse.Namespace, task_dir: Path | None, local_tasks: dict) -> None:
    """The line after lm_eval's own error (often a long traceback): where the failing task's data comes from.
    A task of the user's own (--task-dir) reads its files as its YAML says; a hub task, offline, only the
    Hugging Face cache."""
    asked = [t for t in (t.strip() for t in args.tasks.split(",")) if t and not t.startswith("memlayers_facts")]
    own = [t for t in asked if t in local_tasks]
    hub_tasks = [t for t in asked if t not in local_tasks]
    if own and args.task_dir:
        files = ", ".join(f"{t} ({local_tasks[t].name})" for t in own)
        print(
            f"error: lm_eval exited with status {status}. {files} {'is a task' if len(own) == 1 else 'are tasks'} "
            f"of --task-dir {task_dir}: lm_eval's error above concerns {'its' if len(own) == 1 else 'their'} "
            "YAML or the data files it names",
            file=sys.stderr,
        )
    if hub_tasks and not args.online:  # lm_eval's own error is a datasets traceback
        print(
            f"error: lm_eval exited with status {status}. memlayers-eval runs it offline unless --online, so "
            f"the data of {', '.join(hub_tasks)} is read only from the Hugging Face cache: on a machine that "
            "reaches the hub, pass --online",
            file=sys.stderr,
        )


def main(argv=None) -> int:
    args = parse_args(argv)

    from pretrain.data import DataError
    from pretrain.export.errors import ExportError
    from pretrain.export.folders import check_export_dir, export_tokenizer_path

    export_dir = Path(args.export_dir).resolve()
    scratch = None
    try:
        try:
            export_tokenizer_path(export_dir)  # first: it tells a run directory or a missing folder apart
            check_export_dir(export_dir, needed=("config.json",))
            from pretrain.export.lm_eval_tasks import check_task_dir, write_fact_tasks  # torch (seconds)

            task_dir = Path(args.task_dir) if args.task_dir else None
            if args.write_tasks or (task_dir is None and "memlayers_facts" in args.tasks):
                task_dir = Path(args.write_tasks) if args.write_tasks else Path(scratch := tempfile.mkdtemp("-tasks"))
                info = write_fact_tasks(
                    export_dir, task_dir, args.probes_dir, limit=args.probes, new_facts=args.new_facts
                )
                kind = "new-fact" if args.new_facts else "trained-fact"
                other = "trained" if args.new_facts else "new (held out of pretraining)"
                left_out = f"{info['skipped']} longer than the model's context left out"
                if info["other_facts"]:
                    left_out += f"; {info['other_facts']} {other} facts not asked"
                if info["mc_skipped"]:
                    left_out += f"; {info['mc_skipped']} out of the multiple choice: their attribute has one value"
                print(
                    f"wrote {', '.join(info['tasks'])} ({info['probes']} {kind} probes, {left_out}) to {task_dir}",
                    file=sys.stderr,
                )
                if args.write_tasks:
                    return 0
            local_tasks = check_task_dir(task_dir) if task_dir is not None else {}
        except (ExportError, DataError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        cmd = lm_eval_command(
            export_dir,
            args.tasks,
            task_dir,
            args.batch_size,
            args.device,
            Path(args.output) if args.output else None,
            args.limit,
        )
        env = dict(os.environ)
        if not args.online:
            env.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        print("+ " + shlex.join(cmd), file=sys.stderr)
        status = subprocess.run(cmd, env=env, check=False).returncode
        if status != 0:
            _explain_failure(status, args, task_dir, local_tasks)
        return status
    finally:  # the scratch task folder goes also when writing or checking it failed
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
