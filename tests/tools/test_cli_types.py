"""pretrain/cli.py: the argparse types the tools share, and that no tool keeps its own copy."""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.cli import fraction, output_folder, positive_int, positive_number, torch_device

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def test_positive_int_names_the_option_and_the_value(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=positive_int)
    assert parser.parse_args(["--n", "3"]).n == 3
    for value, message in (("0", "0 must be an integer >= 1"), ("-3", "-3 must be an integer >= 1"),
                           ("2.5", "'2.5' is not an integer; give an integer >= 1")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--n", value])
        assert exit_.value.code == 2 and f"argument --n: {message}" in capsys.readouterr().err


def test_one_positive_int_for_every_tool():
    """generate and memlayers_eval each had their own copy."""
    for name in ("generate", "memlayers_eval", "train_tokenizer", "perplexity", "model_info"):
        assert importlib.import_module(f"tools.{name}").positive_int is positive_int
    assert [p.name for p in TOOLS.glob("*.py") if "def positive_int" in p.read_text()] == []


def test_positive_number_refuses_zero_nan_inf_and_text(capsys):
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", type=positive_number("1.0 = off"))
    parser.add_argument("--s", type=positive_number("e.g. 3", what="number of seconds"))
    assert parser.parse_args(["--x", "0.5", "--s", "1e-3"]) == argparse.Namespace(x=0.5, s=1e-3)
    for option, value, message in (
        ("--x", "0", "0 must be a finite number > 0 (1.0 = off)"),
        ("--x", "-1", "-1 must be a finite number > 0 (1.0 = off)"),
        ("--x", "nan", "nan must be a finite number > 0 (1.0 = off)"),
        ("--x", "inf", "inf must be a finite number > 0 (1.0 = off)"),
        ("--x", "a", "'a' is not a number; give a number > 0 (1.0 = off)"),
        ("--s", "0", "0 must be a finite number of seconds > 0 (e.g. 3)"),
    ):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args([option, value])
        assert exit_.value.code == 2 and f"argument {option}: {message}" in capsys.readouterr().err


def test_fraction_takes_exactly_the_interval_zero_excluded_to_one(capsys):
    """generate --top-p 1.5 passed the parse (positive_number) and was refused only after the
    export's tokenizer was read."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--p", type=fraction("1 = off", what="probability mass"))
    for value in ("1", "1.0", "0.5", "1e-9"):
        assert parser.parse_args(["--p", value]).p == float(value)
    for value in ("0", "-0.1", "1.0000001", "2", "nan", "inf"):
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--p", value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and f"argument --p: {value} must be a probability mass in (0, 1] (1 = off)" in err
    with pytest.raises(SystemExit):
        parser.parse_args(["--p", "half"])
    assert "'half' is not a number; give a probability mass in (0, 1] (1 = off)" in capsys.readouterr().err


def test_every_tool_that_saves_a_figure_parses_its_name_with_image_file():
    """plot_lr_schedule --out, slot_report --out, bench_kernels --plot and bench_values --plot took
    any name (output_file) and crashed with matplotlib's "Format 'xyz' is not supported" only at
    the save, after the work that made the figure."""
    drawing = [p for p in TOOLS.glob("*.py") if "save_figure(" in p.read_text() or "savefig(" in p.read_text()]
    drawing += [TOOLS / "slot_report.py"]  # pretrain.slots.report.render_report saves it
    assert len(drawing) >= 4
    assert [p.name for p in drawing if "image_file(" not in p.read_text()] == []


def test_torch_device_names_the_device_and_what_this_machine_has(monkeypatch, capsys):
    """generate, smf_finetune and bench_slots --device nope failed with torch's or safetensors'
    traceback after the export was loaded; --device cuda on a machine without one likewise."""
    import torch

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", type=torch_device)
    assert parser.parse_args(["--device", "cpu"]).device == "cpu"
    assert parser.parse_args(["--device", "cpu:0"]).device == "cpu"  # safetensors refuses "cpu:0"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    cases = [
        ("nope", "'nope' is not a device: give cpu, or cuda (cuda:N for GPU N)"),
        ("meta", "meta: the tools run on cpu or cuda"),
        ("cuda", "cuda: this machine has no CUDA device torch can use: give cpu"),
    ]
    for value, message in cases:
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--device", value])
        assert exit_.value.code == 2 and f"argument --device: {message}" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parser.parse_args(["--device", "cuda:1"]).device == "cuda:1"
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "cuda:2"])
    assert "cuda:2: this machine has 2 CUDA devices: give cuda:0 to cuda:1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "tool, argv",
    [
        ("generate", ["export", "--prompt", "hi"]),
        ("smf_finetune", ["--export", "e", "--data", "d", "--out", "o"]),
        ("bench_slots", ["--steps", "1"]),
        ("perplexity", ["export"]),
        ("memlayers_eval", ["export"]),
    ],
)
def test_tools_refuse_a_device_at_the_parse(tool, argv, capsys):
    module = importlib.import_module(f"tools.{tool}")
    with pytest.raises(SystemExit) as exit_:
        (getattr(module, "parse_args", None) or module.main)([*argv, "--device", "nope"])
    assert exit_.value.code == 2 and "argument --device: 'nope' is not a device" in capsys.readouterr().err


def test_one_positive_number_for_every_tool():
    """generate (--repetition-penalty) and bench_data (--seconds) each parsed their own finite float > 0."""
    assert [p.name for p in TOOLS.glob("*.py") if "= float(text)" in p.read_text()] == []


def test_a_file_as_output_folder_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """smf_report --out naming a file ended in a bare FileExistsError (out.mkdir) after the
    config was loaded and the dataset prepared."""
    smf_report = importlib.import_module("tools.smf_report")
    assert smf_report.output_folder is output_folder
    monkeypatch.setattr("pretrain.config.load_config", lambda *a, **k: pytest.fail("config loaded"))
    (tmp_path / "file").write_text("keep")
    with pytest.raises(SystemExit) as exit_:
        smf_report.main(["--out", str(tmp_path / "file")])
    assert exit_.value.code == 2
    assert f"argument --out: {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep"
    assert smf_report.parse_args(["--out", str(tmp_path / "new")]).out == str(tmp_path / "new")  # not made yet: fine


def test_outputs_through_a_file_are_refused_and_missing_folders_are_fine(tmp_path):
    """Every output path type (and the export folder check) takes a path whose folders do not exist
    yet (the write makes them, as `mkdir -p`) and refuses one through a file, which failed with a bare
    FileExistsError or NotADirectoryError only at the write, after the work (perplexity --json
    notes.txt/loss.json after scoring)."""
    from pretrain.cli import image_file, output_file
    from pretrain.export import ExportError
    from pretrain.export.writer import check_output_folder

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "gone").symlink_to(tmp_path / "missing")  # a dangling link is no folder either
    for check in (output_file("x.json"), image_file("x.png"), output_folder):
        missing = tmp_path / "new" / "deeper" / "x.png"
        assert check(str(missing)) == str(missing)
        for blocker in (tmp_path / "notes.txt", tmp_path / "gone"):
            with pytest.raises(argparse.ArgumentTypeError) as refused:
                check(str(blocker / "sub" / "x.png"))
            assert str(refused.value) == (
                f"{blocker / 'sub' / 'x.png'}: {blocker} is a file, not a folder, so nothing can be written "
                "under it; name a path under a folder (missing folders are made)"
            )
    check_output_folder(tmp_path / "new" / "export")
    with pytest.raises(ExportError, match=rf"{tmp_path / 'notes.txt'} is a file, not a folder, so no export"):
        check_output_folder(tmp_path / "notes.txt" / "export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone", "notes.txt"]  # nothing made by a check


# Plain type=int options that need no pretrain.cli type, and why.
OWN_CHECK = {
    "--seed": "every integer is a seed (hashed, or given to torch.manual_seed), negatives included",
    "--master-port": "pretrain.sbatch_script refuses a port outside 1024..65535 before anything is written",
}


def declared_options(main, monkeypatch) -> list[tuple[str, object]]:
    """(first option string, type) of every argument `main`'s parser declares, read off its `--help` run."""
    seen = []
    real = argparse._ActionsContainer.add_argument

    def record(self, *names, **kwargs):
        if "choices" not in kwargs:  # a closed list is its own check
            seen.append((names[0], kwargs.get("type")))
        return real(self, *names, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(argparse._ActionsContainer, "add_argument", record)
        with pytest.raises(SystemExit) as exit_:
            main(["--help"])
    assert exit_.value.code == 0 and seen
    return seen


CLI_MODULES = sorted(f"tools.{p.stem}" for p in TOOLS.glob("*.py")) + ["pretrain.resharding", "pretrain.demo"]


@pytest.mark.parametrize("module", CLI_MODULES)
def test_every_count_and_number_option_is_checked_at_parse_time(module, monkeypatch, capsys):
    """A bare type=int / type=float takes 0, -5 and nan alike: `generate --max-new-tokens -5`,
    `profile --steps 0`, `smf_finetune --lr nan` were refused only after loading (or never, training
    on a NaN learning rate). Each such option uses a pretrain.cli type (positive_int, int_at_least,
    positive_number, non_negative_number) that refuses them when the arguments are parsed."""
    options = declared_options(importlib.import_module(module).main, monkeypatch)
    capsys.readouterr()
    unchecked = [name for name, kind in options if kind in (int, float) and name not in OWN_CHECK]
    assert unchecked == [], f"{module}: {unchecked} take any number: give them a pretrain.cli type"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "nan"], "argument --lr: nan must be a finite number > 0"),  # was taken: a NaN learning rate
        (["--max-grad-norm", "nan"], "argument --max-grad-norm: nan must be a finite number >= 0 (0 = off)"),
        (["--max-grad-norm", "-1"], "argument --max-grad-norm: -1 must be a finite number >= 0 (0 = off)"),
        (["--top-t", "0"], "argument --top-t: 0 must be an integer >= 1"),
        (["--method", "lora", "--lora-rank", "-2"], "argument --lora-rank: -2 must be an integer >= 1"),
    ],
)
def test_smf_finetune_refuses_nan_and_non_positive_numbers(flags, message, capsys):
    smf_finetune = importlib.import_module("tools.smf_finetune")
    with pytest.raises(SystemExit) as exit_:
        smf_finetune.parse_args(["--export", "e", "--data", "d", "--out", "o", *flags])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_plain_warnings_shortens_only_the_projects_own_warnings(tmp_path, repo_root):
    """plain_warnings printed every warning as `warning: <message>`, so a library's lost what it is: pyarrow's
    FutureWarning, a library's UserWarning and numpy's `RuntimeWarning: divide by zero` all read as the tools'
    own notes, with no category and no file or line. Now only UserWarnings raised in the project's folders
    print so; the rest print as Python prints them (the reference: warnings.formatwarning outside the block,
    in a fresh interpreter)."""
    import subprocess
    import sys

    (tmp_path / "library.py").write_text(
        "import warnings\n"
        "def old_api():\n"
        "    warnings.warn('old_api is deprecated', FutureWarning, stacklevel=1)\n"
        "def note():\n"
        '    warnings.warn("a library\'s note", UserWarning, stacklevel=1)\n'
    )
    project_file = str(repo_root / "pretrain" / "data" / "corpus.py")
    script = (
        "import sys, warnings\n"
        f"sys.path[:0] = [{str(tmp_path)!r}, {str(repo_root)!r}]\n"
        "import numpy as np, library\n"
        "from pretrain.cli import plain_warnings\n"
        "def all_of_them():\n"
        "    library.old_api()\n"
        "    library.note()\n"
        "    np.float64(1.0) / 0\n"
        f"    warnings.warn_explicit('divide by zero encountered in divide', RuntimeWarning, {project_file!r}, 5)\n"
        f"    warnings.warn_explicit('a note of the project', UserWarning, {project_file!r}, 6)\n"
        "with plain_warnings():\n"
        "    all_of_them()\n"
        "print('---', file=sys.stderr)\n"
        "all_of_them()\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    inside, outside = done.stderr.split("---\n")
    others, project_note = outside.split(f"{project_file}:6: UserWarning: a note of the project\n")
    assert others.count("Warning: ") == 4 and project_note.startswith("  ")  # Python's: the line of code below
    assert "FutureWarning: old_api is deprecated" in others and "RuntimeWarning: divide by zero" in others
    assert inside == others + "warning: a note of the project\n"


LONG_OUTPUT_TOOL = """
import sys
from pretrain.cli import ends_quietly_when_the_reader_stops

@ends_quietly_when_the_reader_stops
def main():
    for i in range(200_000):  # far past a pipe's buffer: the reader has gone long before the end
        print(f"{i}\\tslot\\t0.001\\ttokens")
    return 0

sys.exit(main())
"""


@pytest.mark.parametrize("wrapped", [True, False])
def test_a_reader_that_stops_early_ends_a_tool_quietly(tmp_path, wrapped):
    """`memlayers-tfidf ... | head` (500 lines by default) printed a BrokenPipeError traceback once
    head had its lines; a wrapped main ends with status 1 and nothing on stderr, as `cat` does.
    Unwrapped (the control) the traceback is there."""
    import subprocess
    import sys

    source = LONG_OUTPUT_TOOL if wrapped else LONG_OUTPUT_TOOL.replace("@ends_quietly_when_the_reader_stops\n", "")
    script = tmp_path / "tool.py"
    script.write_text(source)
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert proc.stdout.readline() == b"0\tslot\t0.001\ttokens\n"
    proc.stdout.close()  # what head does after its lines
    err = proc.stderr.read().decode()
    status = proc.wait(timeout=60)
    if wrapped:
        assert (status, err) == (1, "")
    else:
        assert status != 0 and "BrokenPipeError" in err


OTHER_PIPE_TOOL = """
import subprocess, sys
from pretrain.cli import ends_quietly_when_the_reader_stops

@ends_quietly_when_the_reader_stops
def main():
    print("first line", flush=True)
    child = subprocess.Popen([sys.executable, "-c", "pass"], stdin=subprocess.PIPE)
    child.wait()  # it has gone: writing to its stdin breaks that pipe, not stdout's
    child.stdin.write(b"x" * 1_000_000)
    child.stdin.flush()
    return 0

sys.exit(main())
"""


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(tmp_path):
    """Only the reader of stdout going away is quiet: a pipe to a subprocess (or a worker) breaking is
    a fault, and its traceback and a failing status reach the user while stdout's reader still reads."""
    import subprocess
    import sys

    script = tmp_path / "tool.py"
    script.write_text(OTHER_PIPE_TOOL)
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=repo, timeout=60,
        env={**os.environ, "PYTHONPATH": str(repo)},
    )  # fmt: skip
    assert done.stdout == "first line\n"
    assert done.returncode != 0 and "BrokenPipeError" in done.stderr


def test_the_tools_with_long_output_end_quietly_when_the_reader_stops():
    """tfidf (a ranking of --top 500 lines), generate (--probes: a line per probe), inspect_data
    (--rows) and submit (--dry-run of a sweep)."""
    for name in ("tfidf", "generate", "inspect_data", "submit"):
        main = importlib.import_module(f"tools.{name}").main
        assert main.__wrapped__.__module__ == f"tools.{name}", name


def test_every_tools_help_description_is_its_whole_first_paragraph():
    """A tool's --help took the first line of its docstring: four (bench_attention, bench_objective,
    bench_shard_check, compare_dense) stopped mid-sentence ('... SDPA with the dense'). Those use
    pretrain.cli.help_description; a tool that still takes the first line must have a one-line first
    paragraph."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    from pretrain.cli import help_description

    assert help_description("\nA first sentence that\nruns on.\n\nMore.\n") == "A first sentence that runs on."
    root = Path(__file__).resolve().parents[2]
    for tool in sorted((root / "tools").glob("*.py")):
        source = tool.read_text()
        doc = ast.get_docstring(ast.parse(source), clean=False)
        if "__doc__.splitlines()[0]" in source:
            assert doc.splitlines()[0].strip() == help_description(doc), f"{tool.name}: --help cuts its first sentence"
    shown = subprocess.run(
        [sys.executable, str(root / "tools" / "bench_attention.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "SDPA with the dense document mask, and FlexAttention with the block mask" in " ".join(shown.split())


def test_a_png_name_is_checked_without_importing_matplotlib(tmp_path):
    """image_file imported matplotlib (0.27 s) to check every name, so slot_report's refusal of a
    missing table took 0.38 s instead of 0.1; a .png (or no suffix) is now checked without it. The
    reference is sys.modules of a fresh interpreter after the tool's refusal; another suffix still
    asks matplotlib."""
    script = (
        "import sys\n"
        "from tools.slot_report import main\n"
        "print('exit', main(sys.argv[1:]))\n"
        "print('matplotlib' in sys.modules)\n"
        "from pretrain.cli import image_file\n"
        "image_file('x.png')(sys.argv[-1][:-4] + '.svg')\n"
        "print('matplotlib' in sys.modules)\n"
    )
    argv = ["--table", str(tmp_path / "missing"), "--out", str(tmp_path / "report.png")]
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=TOOLS.parent, capture_output=True, text=True)
    assert done.stdout.splitlines() == ["exit 2", "False", "True"], done.stdout + done.stderr
    assert f"slot table path {tmp_path / 'missing'} does not exist" in done.stderr
