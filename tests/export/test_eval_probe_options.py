"""memlayers-eval's probe options (--probes, --new-facts, --probes-dir) choose the probes of the
fact tasks it writes; with --tasks leaving those out they chose nothing and were ignored in
silence. They are now refused before anything runs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import tools.memlayers_eval as memlayers_eval_tool


@pytest.mark.parametrize(
    "options",
    [
        ["--probes", "3"],
        ["--new-facts"],
        ["--probes-dir", "somewhere"],
        ["--probes-dir", "x", "--probes", "2", "--new-facts"],
    ],
)
def test_probe_options_without_a_fact_task_are_refused(data_cache, tmp_path, monkeypatch, capsys, options):
    """Before, lm_eval ran the hub tasks as if the options were not there."""
    export = tmp_path / "export"  # what the tool reads before lm_eval: the tokenizer and config.json
    export.mkdir()
    dataset = next(p.parent for p in Path(data_cache).rglob("manifest.json"))
    shutil.copy(dataset / "tokenizer.model", export / "tokenizer.model")
    (export / "config.json").write_text("{}")
    ran = []
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: ran.append(a) or subprocess.CompletedProcess(a, 0))
    assert memlayers_eval_tool.main([str(export), "--tasks", "triviaqa,nq_open"]) == 0 and len(ran) == 1
    with pytest.raises(SystemExit) as exit_info:
        memlayers_eval_tool.main([str(export), "--tasks", "triviaqa,nq_open", *options])
    assert exit_info.value.code == 2 and len(ran) == 1
    err = capsys.readouterr().err
    named = [o for o in options if o.startswith("--")]
    assert f"{', '.join(named)} choose the probes of the fact tasks" in err
    assert "and --tasks triviaqa,nq_open has neither" in err


def test_probe_options_with_a_fact_task_are_taken(monkeypatch):
    """--tasks memlayers_facts_mc alone still takes them (it is a fact task): the check passes and
    the export is looked at (here: no such folder, exit 2 with its message, not a usage error)."""
    assert memlayers_eval_tool.main(["/nonexistent-export", "--tasks", "memlayers_facts_mc", "--probes", "3"]) == 2


def test_probes_dir_with_a_written_task_folder_is_refused(tmp_path, capsys):
    """--task-dir's tasks are asked as written: --probes-dir chose nothing there either."""
    with pytest.raises(SystemExit) as exit_info:
        memlayers_eval_tool.main([str(tmp_path), "--task-dir", str(tmp_path / "t"), "--probes-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--probes-dir and --task-dir: the folder's tasks are asked as written" in capsys.readouterr().err
