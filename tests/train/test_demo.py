"""The main job's entry point (`make demo`), shortened: it trains, then reports where things are."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain import demo
from tests.train.helpers import TINY


def recipe_arguments(command: str) -> list[str]:
    """The arguments `make demo ARGS=...` hands pretrain.demo, as the shell and make would."""
    make, target, assignment = shlex.split(command)
    assert (make, target) == ("make", "demo") and assignment.startswith("ARGS=")
    return shlex.split(assignment.removeprefix("ARGS=").replace("$$", "$"))


def test_shortened_demo_end_to_end(tmp_path, data_cache, capsys):
    run_dir = tmp_path / "demo"
    run_dir.mkdir()
    (run_dir / demo.DEMO_MARK).write_text("")  # an earlier demo's folder: replaced, not resumed
    (run_dir / "stale-file").write_text("a previous demo run")
    code = demo.main(
        [
            "--config",
            "configs/tiny.yaml",
            *TINY,
            f"train.run_dir={run_dir}",
            f"data.cache_dir={data_cache}",
            "train.max_steps=12",
            "train.eval_every=12",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "=== demo finished ===" in out
    first, last = (float(x.split()[0]) for x in out.split("train loss: ")[1].split(" -> "))
    assert last < first
    for label in ("validation loss", "fact recall", "checkpoint:", "slot table:", "TensorBoard:"):
        assert label in out
    table = Path(out.split("slot table:")[1].split()[0])
    assert table.is_file() and table.parent.parent.parent == run_dir
    assert not (run_dir / "stale-file").exists()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_a_demo_stopped_early_says_so_and_how_to_continue(tmp_path, data_cache, capsys):
    """A demo stopped by a signal or train.stop_after printed '=== demo finished ===', and the
    next plain `make demo` deletes the run it could have continued."""
    run_dir = tmp_path / "demo"
    args = ["--config", "configs/tiny.yaml", *TINY, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"]
    assert demo.main([*args, "train.max_steps=6", "train.stop_after=2"]) == 0
    out = capsys.readouterr().out
    assert "demo finished" not in out
    assert "=== demo stopped at step 2 of 6 (by train.stop_after) ===" in out
    printed = recipe_arguments(out.split("continue it with ")[1].split(" (a plain make demo")[0])
    assert printed[0] == "--resume" and f"train.run_dir={run_dir}" in printed
    assert "(first 1 step) -> " in out and "(last 1 step)" in out  # was first 2 -> last 2: the same 2 steps
    assert demo.main(printed) == 0  # the printed command's arguments, verbatim
    out = capsys.readouterr().out
    assert "=== demo finished ===" in out
    # the resumed demo's losses are of steps 3-6: it called them the run's first steps (5.937 at the
    # demo's step 1-10 became 4.824, steps 16-25 of a resumed 30-step demo)
    assert "(first 2 steps of this run, from step 3) -> " in out and "(last 2 steps)" in out  # halves of 4


@pytest.mark.parametrize("steps", [0, 1, 2, 3, 5, 19, 20, 21, 40])
def test_the_loss_windows_never_share_a_step(steps):
    """A demo shorter than 20 steps compared the means of first 10 and last 10 losses, which
    overlapped (12 steps: 8 of them in both) or were the same steps (10 or fewer)."""
    losses = [float(i) for i in range(steps)]  # each loss is its step's index
    head, tail = demo.loss_windows(losses)
    expected = min(10, steps // 2)
    assert head == losses[:expected] and tail == losses[steps - expected :]
    assert not set(head) & set(tail)


def test_the_printed_continue_command_keeps_the_runs_arguments(tmp_path, data_cache, capsys):
    """It printed make demo ARGS="--resume" whatever the run: for one started with
    train.run_dir=runs/demo2 train.max_steps=60 that resumed runs/demo instead, and for
    train.max_steps=60 alone it asked for the default 1000 steps, a schedule change the resume
    refused with a traceback (as it refuses another optim.lr). The run's own arguments are kept, less train.stop_after (which would
    stop the resumed run at once), and a refused resume is an error line, not a traceback."""
    run_dir = tmp_path / "elsewhere"
    args = ["--config", "configs/tiny.yaml", *TINY, f"train.run_dir={run_dir}", f"data.cache_dir={data_cache}"]
    command = demo.continue_command([*args, "train.max_steps=6", "train.stop_after=2"])
    assert recipe_arguments(command) == ["--resume", *args, "train.max_steps=6"]
    assert demo.main([*args, "train.max_steps=6", "train.stop_after=2"]) == 0
    capsys.readouterr()
    assert demo.main([*args, "train.max_steps=6", "optim.lr=0.01", "--resume"]) == 2  # another schedule
    err = capsys.readouterr().err
    assert err.startswith("error: resuming at step 2 with another learning-rate schedule") and "Traceback" not in err


def test_demo_reports_config_errors(capsys):
    assert demo.main(["--config", "configs/tiny.yaml", "train.max_step=3"]) == 2
    assert "did you mean 'train.max_steps'" in capsys.readouterr().err


def test_demo_refuses_to_delete_a_run_folder_it_did_not_make(tmp_path, capsys):
    """make demo ARGS="train.run_dir=runs/english" deleted that run, checkpoints included."""
    run_dir = tmp_path / "english"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "latest").write_text("step_00000200")
    assert demo.main(["--config", "configs/tiny.yaml", f"train.run_dir={run_dir}"]) == 2
    assert f"train.run_dir={run_dir} exists and was not made by the demo" in capsys.readouterr().err
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000200"
    assert demo.replace_refusal(tmp_path / "new") is None  # absent, empty or the default: replaced
    (tmp_path / "empty").mkdir()
    assert demo.replace_refusal(tmp_path / "empty") is None


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_the_continue_command_runs_as_printed_whatever_the_path_holds(tmp_path):
    """It wrapped the arguments in double quotes by hand: a run folder with a `$` in its name lost it
    to the shell's expansion, and one with a double quote was a syntax error. The printed command,
    run by bash through the Makefile's own demo rule, hands pretrain.demo the arguments as given."""
    recipe = (Path(__file__).resolve().parents[2] / "Makefile").read_text().split("\ndemo:")[1].splitlines()[1]
    assert recipe.startswith("\t") and "$(ARGS)" in recipe
    show_argv = "import json, sys; print(json.dumps(sys.argv[1:]))"
    (tmp_path / "Makefile").write_text(
        f"PY := {shlex.quote(sys.executable)} -c {shlex.quote(show_argv)}\ndemo:\n{recipe}\n"
    )
    # as typed into a shell: under `make test` the inherited MAKELEVEL makes the inner make print
    # "make[1]: Leaving directory ..." after the recipe's output
    shell_env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    for run_dir in ("runs/my demo", 'runs/a"b', "runs/$HOME", "runs/it's", "runs/a\\b;`x`*"):
        args = ["--config", "configs/tiny.yaml", f"train.run_dir={run_dir}", "train.max_steps=6"]
        command = demo.continue_command([*args, "train.stop_after=2"])
        ran = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, check=True, env=shell_env
        )
        assert json.loads(ran.stdout.splitlines()[-1]) == ["-m", "pretrain.demo", "--resume", *args], command


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_builds_its_ops_where_the_readmes_other_commands_load_them(tmp_path):
    """The Makefile exported TORCH_EXTENSIONS_DIR=~/.cache/memlayers/torch_extensions, and every other
    command of the README (`python -m pretrain.train ...` of "Train on your own text", run outside make)
    builds in torch's default folder: after `make demo`, a fresh clone's first training command built
    DeepSpeed's comm op and memlayers' CPU ops a second time (124 s + part of a 74 s first step on 2
    loaded cores). The folder the demo's process builds in, run through the Makefile's own demo rule,
    is the one the same Python finds run directly."""
    repo = Path(__file__).resolve().parents[2]
    show_root = "from kernels.build_locks import extensions_root; print(extensions_root())"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    env["HOME"] = str(tmp_path)  # where both defaults lie; nothing is built
    env["PYTHONPATH"] = str(repo)
    direct = subprocess.run(
        [sys.executable, "-c", show_root], capture_output=True, text=True, check=True, env=env
    ).stdout.strip()
    through_make = subprocess.run(
        [
            "make",
            "-s",
            "-C",
            str(repo),
            "demo",
            "STAMP=",
            f"PY={shlex.quote(sys.executable)} -c {shlex.quote(show_root)}",
        ],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stdout.strip()
    assert direct.startswith(str(tmp_path)) and through_make == direct
