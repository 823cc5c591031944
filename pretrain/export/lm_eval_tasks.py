"""lm-evaluation-harness task definitions for the fact world's probes, written for one export.

`write_fact_tasks(export_dir, out_dir)` writes YAML task files plus their JSONL data (no hub
download; `lm_eval --include_path out_dir` reads them offline):

  memlayers_facts      group, exact-match generation: the greedy continuation of
                       "</s>question" must be the answer. One subtask per answer length in
                       tokens (memlayers_facts_len<n>, max_gen_toks = n), so generation stops
                       exactly after the answer's tokens; the group's exact_match is the mean
                       over all probes, the quantity `pretrain.evaluate.fact_recall` measures.
  memlayers_facts_mc   multiple choice by log-likelihood among the answer and up to
                       `choices - 1` other values of the same attribute (metric acc).

Prompts start with the tokenizer's EOS piece as text ("</s>"): training documents follow an
EOS, and the export's tokenizer turns that text into the EOS id. Probes whose question and
answer do not fit the model's max_seq_len are left out (as fact_recall leaves them out), and
so are the new facts held out of pretraining (`is_new_fact`), as the training run's fact recall
leaves them out; `new_facts=True` asks those alone instead.
`check_task_dir` validates a written folder before lm_eval runs (the fact tasks in it; other tasks are lm_eval's).
"""

from __future__ import annotations

import json
import numbers
import random
from pathlib import Path

from pretrain.evaluate import answer_tokens
from pretrain.export.errors import ExportError
from pretrain.export.loading import export_probes, export_tokenizer, model_config_from_json
from pretrain.files import TEMP_MARK, atomic_write

GROUP = "memlayers_facts"
MC_TASK = "memlayers_facts_mc"
DATA_KEYS = {"question", "answer"}


def eos_piece(tokenizer_path: Path) -> str:
    """The EOS piece's text ("</s>"), which the export's HF tokenizer reads back as the EOS id."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
    return sp.id_to_piece(sp.eos_id())


def _task_yaml(name: str, data: Path, **fields) -> str:
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data.resolve())}},
        "test_split": "test",
        **fields,
        "metadata": {"version": 1.0},
    }
    return json.dumps(config, indent=2) + "\n"  # JSON is YAML: no quoting surprises in questions


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    # json.dumps escapes non-ASCII: the text is the same in any encoding
    atomic_write(path, "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))


def _refuse_empty_answers(probes, tokenizer, path: Path) -> None:
    """An answer of no tokens would be an empty continuation in lm-eval, whose HF model asserts on
    one (a bare AssertionError, mid-evaluation, for its own question and every question offering it
    as an option), and a generation task of max_gen_toks 0 that counts the empty output right."""
    for line, probe in enumerate(probes, 1):
        if not answer_tokens(probe, tokenizer, tokenizer.encode(probe.question)):
            raise ExportError(
                f"{path}:{line}: the answer to {probe.question!r} is {probe.answer!r}, no tokens: lm-eval "
                "cannot score an empty continuation; give the probe its answer or delete the line"
            )


def write_fact_tasks(
    export_dir: str | Path,
    out_dir: str | Path,
    probes_dir: str | Path | None = None,
    limit: int | None = None,
    choices: int = 4,
    seed: int = 0,
    new_facts: bool = False,
) -> dict:
    """Write the task folder; returns {"tasks": [...], "probes": kept, "skipped": too long,
    "other_facts": the probes of the other kind (new facts, or with `new_facts` the trained ones)}.
    `limit` (an int >= 1) keeps the first `limit` probes of the kind asked, None all of them. Each file is written
    under a temporary name and renamed: an interrupted write leaves the previous file whole."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1):
        raise ExportError(f"limit={limit!r} must be an integer >= 1 (the number of probes to keep), or None for all")
    if isinstance(choices, bool) or not isinstance(choices, numbers.Integral) or choices < 2:
        raise ExportError(f"choices={choices!r} must be an integer >= 2 (the answer and at least one other option)")
    export_dir, out_dir = Path(export_dir), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(
            f"{out_dir} is a file: the tasks are written into a folder; name a folder (--write-tasks DIR)"
        )
    tokenizer = export_tokenizer(export_dir)
    max_seq_len = model_config_from_json(export_dir / "config.json").max_seq_len
    all_probes = export_probes(
        export_dir,
        probes_dir,
        other_fix=", or evaluate other --tasks (hub tasks with --online, or your own task YAMLs with --task-dir)",
    )
    _refuse_empty_answers(all_probes, tokenizer, Path(probes_dir or export_dir) / "probes.jsonl")
    asked = [p for p in all_probes if p.is_new_fact == new_facts]
    prefix = eos_piece(tokenizer.path)
    kept, by_length, skipped = _probes_that_fit(asked[:limit], tokenizer, max_seq_len)
    if not kept:
        kind = "new-fact" if new_facts else "trained-fact"
        raise ExportError(
            f"no {kind} probe of {probes_dir or export_dir}/probes.jsonl fits the model's max_seq_len="
            f"{max_seq_len} with its answer ({len(asked)} {kind} probes in the file): nothing to evaluate"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    text = f"{prefix}{{{{question}}}}"
    subtasks = _write_generation_tasks(out_dir, by_length, text)
    mc_skipped = _write_choice_task(out_dir, kept, all_probes, text, choices, seed)
    return {
        "tasks": [GROUP, MC_TASK],
        "subtasks": subtasks,
        "probes": len(kept),
        "skipped": skipped,
        "mc_skipped": mc_skipped,
        "other_facts": len(all_probes) - len(asked),
    }


def _probes_that_fit(probes, tokenizer, max_seq_len: int) -> tuple[list[dict], dict[int, list[dict]], int]:
    """(the task rows of the probes that fit, in probe order; the same rows by answer length in
    tokens; how many probes did not fit): lm_eval keeps context + max_gen_toks within max_length,
    "</s>" + question + answer."""
    by_length: dict[int, list[dict]] = {}
    kept, skipped = [], 0
    for probe in probes:
        question = tokenizer.encode(probe.question)
        n = len(answer_tokens(probe, tokenizer, question))
        if 1 + len(question) + n > max_seq_len:
            skipped += 1
            continue
        row = {"question": probe.question, "answer": probe.answer, "attribute": probe.attribute}
        by_length.setdefault(n, []).append(row)
        kept.append(row)
    return kept, by_length, skipped


def _write_generation_tasks(out_dir: Path, by_length: dict[int, list[dict]], text: str) -> list[str]:
    """One exact-match generation subtask per answer length (max_gen_toks = that length) and the
    group over them; the subtasks' names."""
    subtasks = []
    for n, rows in sorted(by_length.items()):
        name = f"{GROUP}_len{n}"
        _write_jsonl(out_dir / f"{name}.jsonl", rows)
        atomic_write(
            out_dir / f"{name}.yaml",
            _task_yaml(
                name,
                out_dir / f"{name}.jsonl",
                output_type="generate_until",
                doc_to_text=text,
                doc_to_target="{{answer}}",
                generation_kwargs={"until": [], "max_gen_toks": n, "do_sample": False},
                metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
            ),
        )
        subtasks.append(name)
    atomic_write(
        out_dir / f"{GROUP}.yaml",
        json.dumps(
            {
                "group": GROUP,
                "task": subtasks,
                "aggregate_metric_list": [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": True}],
                "metadata": {"version": 1.0},
            },
            indent=2,
        )
        + "\n",
    )
    return subtasks


def _write_choice_task(out_dir: Path, kept: list[dict], all_probes, text: str, choices: int, seed: int) -> int:
    """The multiple-choice task over the kept rows: the answer among up to `choices - 1` other
    values of its attribute, in a seeded order. Returns how many rows had no other value to offer."""
    rng = random.Random(seed)
    # the other options come from the whole probe file: drawn from the kept probes alone, a
    # small --probes limit left an attribute one value, a question whose only option is right
    values: dict[str, list[str]] = {}
    for probe in all_probes:
        values.setdefault(probe.attribute, [])
        if probe.answer not in values[probe.attribute]:
            values[probe.attribute].append(probe.answer)
    mc_rows, mc_skipped = [], 0
    for row in kept:
        others = [v for v in values[row["attribute"]] if v != row["answer"]]
        if not others:  # an attribute with one value in the whole file: no question to ask
            mc_skipped += 1
            continue
        options = rng.sample(others, min(choices - 1, len(others))) + [row["answer"]]
        rng.shuffle(options)
        mc_rows.append({**row, "choices": options, "label": options.index(row["answer"])})
    _write_jsonl(out_dir / f"{MC_TASK}.jsonl", mc_rows)
    atomic_write(
        out_dir / f"{MC_TASK}.yaml",
        _task_yaml(
            MC_TASK,
            out_dir / f"{MC_TASK}.jsonl",
            output_type="multiple_choice",
            doc_to_text=text,
            doc_to_choice="{{choices}}",
            doc_to_target="{{label}}",
            metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        ),
    )
    return mc_skipped


def check_task_dir(task_dir: str | Path) -> dict[str, Path]:
    """Every task YAML parses, and each fact task's (memlayers_facts*) data file exists with
    question/answer records, or an error naming the file (and line) and how to re-create it. Other
    tasks in the folder (a user's own, over their own text) are lm_eval's to read. Returns the task
    and group names the folder defines, each with its YAML file."""
    import yaml

    task_dir = Path(task_dir)
    fix = "re-write the folder with `memlayers-eval EXPORT --write-tasks DIR` (pretrain.export.lm_eval_tasks)"
    if not task_dir.is_dir():
        raise ExportError(f"no such task folder: {task_dir}: write one with `memlayers-eval EXPORT --write-tasks DIR`")
    files = sorted(task_dir.glob("*.yaml"))
    if not files:
        raise ExportError(f"{task_dir} holds no task .yaml files: {fix}")
    for path in files:  # lm_eval would load a killed writer's temporary as a task too
        if TEMP_MARK in path.name:
            raise ExportError(f"{path} is the temporary of an interrupted write: delete it, or {fix}")
    defined: dict[str, Path] = {}
    for path in files:
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ExportError(f"{path} is not valid YAML ({err}): {fix}") from None
        if not isinstance(config, dict) or not ("task" in config or "group" in config):
            raise ExportError(f"{path} is not a task definition (no 'task' or 'group' key): {fix}")
        name = config["group"] if "group" in config else config["task"]
        if isinstance(name, str):
            defined[name] = path
        if "group" in config or not str(config["task"]).startswith(GROUP):
            continue  # a group, or a task of the user's own beside them: lm_eval reads and checks it as written
        try:
            data = Path(config["dataset_kwargs"]["data_files"]["test"])
        except (KeyError, TypeError):
            raise ExportError(f"{path} names no dataset_kwargs.data_files.test file: {fix}") from None
        if not data.is_file():
            raise ExportError(f"{path}: its data file {data} does not exist: {fix}")
        for lineno, line in enumerate(data.read_text(encoding="utf-8").splitlines(), 1):
            try:
                record = json.loads(line)
            except ValueError as err:
                raise ExportError(f"{data}:{lineno}: not a JSON line ({err}): {fix}") from None
            missing = DATA_KEYS - set(record) if isinstance(record, dict) else DATA_KEYS
            if missing:
                raise ExportError(f"{data}:{lineno}: record lacks {sorted(missing)}: {fix}")
    return defined
