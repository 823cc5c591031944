"""memlayers-eval runs lm_eval offline unless --online. A standard task (hellaswag) then fails inside
lm_eval with a datasets traceback ending `ConnectionError: Couldn't reach 'Rowan/hellaswag' on the Hub
(OfflineModeIsEnabled)`, which named neither memlayers-eval's offline default nor --online. The tool
now ends such a failure with a line that names both."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import tools.memlayers_eval as memlayers_eval_tool


@pytest.fixture
def export_stub(data_cache, tmp_path):
    """What the tool reads before lm_eval: the tokenizer and config.json."""
    export = tmp_path / "export"
    export.mkdir()
    dataset = next(p.parent for p in Path(data_cache).rglob("manifest.json"))
    shutil.copy(dataset / "tokenizer.model", export / "tokenizer.model")
    (export / "config.json").write_text("{}")
    return export


def lm_eval_without_the_hub(cmd, env=None, **_):
    """lm_eval as it behaves here: a hub dataset cannot be read with HF_DATASETS_OFFLINE=1."""
    return subprocess.CompletedProcess(cmd, 1 if (env or {}).get("HF_DATASETS_OFFLINE") == "1" else 0)


@pytest.mark.parametrize(
    "extra,status,named",
    [
        ([], 1, "hellaswag, triviaqa"),  # offline: the failure names the tasks and --online
        (["--online"], 0, None),  # online: the hub is reached, nothing to add
    ],
)
def test_a_hub_task_failing_offline_names_online(export_stub, monkeypatch, capsys, extra, status, named):
    monkeypatch.setattr(subprocess, "run", lm_eval_without_the_hub)
    assert memlayers_eval_tool.main([str(export_stub), "--tasks", "hellaswag,triviaqa", *extra]) == status
    err = capsys.readouterr().err
    if named:
        assert err.splitlines()[-1] == (
            "error: lm_eval exited with status 1. memlayers-eval runs it offline unless --online, so the data "
            f"of {named} is read only from the Hugging Face cache: on a machine that reaches the hub, pass --online"
        )
    else:
        assert "--online" not in err.splitlines()[-1]


def test_a_failing_task_of_ones_own_names_its_task_folder_not_the_hub(export_stub, tmp_path, monkeypatch, capsys):
    """A task of one's own (--task-dir) that failed in lm_eval (its data file moved, say) was blamed on the
    Hugging Face cache and --online, which it never reads. The last line now names the task, its YAML and
    the folder; a hub task asked beside it is still named with --online."""
    tasks = tmp_path / "own-tasks"
    tasks.mkdir()
    (tasks / "own_text.yaml").write_text(
        "task: own_text\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'moved.jsonl'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\n"
    )
    monkeypatch.setattr(subprocess, "run", lambda cmd, env=None, **_: subprocess.CompletedProcess(cmd, 1))
    argv = [str(export_stub), "--task-dir", str(tasks), "--tasks", "own_text"]
    assert memlayers_eval_tool.main(argv) == 1
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (
        f"error: lm_eval exited with status 1. own_text (own_text.yaml) is a task of --task-dir {tasks}: "
        "lm_eval's error above concerns its YAML or the data files it names"
    )
    assert memlayers_eval_tool.main([*argv[:-1], "own_text,hellaswag"]) == 1
    said = capsys.readouterr().err.splitlines()[-2:]
    assert said[0].startswith("error: lm_eval exited with status 1. own_text (own_text.yaml) is a task of")
    assert "the data of hellaswag is read only from the Hugging Face cache" in said[1]
