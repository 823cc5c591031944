"""The wheel: the top-level import names it installs and the console scripts it declares."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "LICENSE", "pretrain", "kernels", "tools")


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory) -> tuple[zipfile.ZipFile, str]:
    """The wheel built from a copy of the sources, and what the build printed."""
    pytest.importorskip("setuptools", minversion="77")
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    # A copy: a build inside the checkout would leave build/, whose stale files later builds pick up.
    for name in SOURCES:
        if (REPO_ROOT / name).is_dir():
            shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO_ROOT / name, src / name)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (path,) = out.glob("memlayers-*.whl")
    return zipfile.ZipFile(path), result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel(wheel_build) -> zipfile.ZipFile:
    return wheel_build[0]


@pytest.mark.slow
def test_the_wheel_ships_the_cpu_op_sources_and_the_build_warns_of_nothing(wheel_build):
    # kernels/csrc holds C++ sources, no __init__.py: listed only as package data, setuptools
    # printed a 30-line "Package 'kernels.csrc' is absent from the `packages` configuration"
    # warning into every fresh `make demo`/`make test` install.
    wheel, log = wheel_build
    sources = {f"kernels/csrc/{p.name}" for p in (REPO_ROOT / "kernels" / "csrc").glob("*.cpp")}
    assert sources and sources <= set(wheel.namelist())
    assert "absent from the `packages` configuration" not in log, log[-3000:]


@pytest.mark.slow
def test_wheel_installs_no_top_level_tools_package(wheel):
    top = {name.split("/")[0] for name in wheel.namelist() if not name.split("/")[0].endswith(".dist-info")}
    # `kernels` stays a top-level name for now (docs/install-gpu.md says why).
    assert top == {"pretrain", "kernels", "memlayers_tools"}
    metadata = next(wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: MIT" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in wheel.namelist())
    assert "kernels/csrc/row_topk.cpp" in wheel.namelist()  # kernels.cpu_ops builds it on first use


@pytest.mark.slow
def test_every_console_script_resolves_to_a_function_in_the_wheel(wheel):
    entry_points = next(wheel.read(n).decode() for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    scripts = [line.split(" = ") for line in entry_points.splitlines() if " = " in line]
    assert len(scripts) >= 15
    names = set(wheel.namelist())
    for script, target in scripts:
        module, func = target.split(":")
        path = module.replace(".", "/") + ".py"
        assert path in names, f"{script}: {target} is not in the wheel"
        tree = ast.parse(wheel.read(path))
        assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, f"{script}: no {func} in {path}"


def test_importing_the_trainer_leaves_triton_and_dynamo_unimported():
    """The kernel tests choose interpreted or compiled Triton before triton is first
    imported, and every tool's start-up pays for what the trainer imports: neither dynamo
    (which imports triton) nor triton may load with the trainer, only when compiling."""
    code = (
        "import sys, pretrain.train, pretrain.parallel, pretrain.parallel.values; "
        "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


SCRIPTS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
# Their --help still imports torch: the benchmarks build their options and helpers from torch; every run
# of each needs it.
HELP_WITH_TORCH = {
    "memlayers-bench-kernels",
    "memlayers-bench-attention",
    "memlayers-bench-data",
    "memlayers-bench-parallel",
}


def run_console_script(script: str, args: list[str]) -> tuple[list[str], str]:
    """(stdout's last two lines: the exit status and the heavy modules imported, stdout + stderr) of
    `script`'s console function run with `args` in a fresh interpreter, from this checkout."""
    module, function = SCRIPTS[script].split(":")
    code = (
        "import os, sys\n"
        "os._exit = sys.exit  # memlayers-train's ends so (pretrain.train.cli says why): the lines below run\n"
        f"sys.argv = [{script!r}, *{args!r}]\n"
        f"from {module.replace('memlayers_tools.', 'tools.')} import {function}\n"
        "try:\n"
        f"    sys.exit({function}())\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code)\n"
        "print(sorted(m for m in ('torch', 'triton', 'deepspeed', 'webdataset') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    return done.stdout.splitlines()[-2:], done.stdout + done.stderr


@pytest.mark.parametrize("script", sorted(set(SCRIPTS) - HELP_WITH_TORCH))
def test_a_console_script_s_help_imports_no_torch(script):
    """`--help` of memlayers-submit, -model-info, -plot-lr-schedule, -slot-report and -tfidf waited for torch
    (2-9 s each on the loaded 2-core machine, 0.1-0.9 s without), imported at their tops or with
    pretrain.model's __init__. The reference is sys.modules of a fresh interpreter after the console
    function printed its help (exit status 0)."""
    last, output = run_console_script(script, ["--help"])
    assert last == ["exit 0", "[]"], output[-4000:]
    assert "usage: " in output, output[:500]


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("memlayers-eval", ["{missing}"], "no such export directory: {missing}"),
        ("memlayers-export", ["{missing}", "{tmp}/out"], "no such run directory or checkpoint: {missing}"),
        ("memlayers-average", ["{run}", "{missing}", "--output", "{tmp}/avg"], "memlayers-export {run} OUT"),
        ("memlayers-perplexity", ["{run}", "--data", "{tmp}"], "memlayers-export {run} OUT"),
        # these three were refused only after torch was imported (2.3-2.7 s on the loaded 2-core machine)
        ("memlayers-perplexity", ["{untokenized}", "--data", "{tmp}"], "{untokenized} has no tokenizer.model"),
        ("memlayers-perplexity", ["{export}", "--data", "{missing}"], "dataset directory {missing} does not exist"),
        ("memlayers-perplexity", ["{export}", "--data", "{tmp}"], "{tmp}/manifest.json is missing: {tmp} is not a"),
        ("memlayers-generate", ["{missing}", "--prompt", "a"], "no such export directory: {missing}"),
        ("memlayers-tfidf", ["--export", "{run}", "--text", "a"], "memlayers-export {run} OUT"),
        ("memlayers-slot-report", ["--table", "{missing}", "--out", "{tmp}/r.png"], "slot table path {missing} does"),
    ],
)
def test_a_missing_or_wrong_folder_is_refused_before_torch_is_imported(script, args, message, tmp_path):
    """The export tools refused a missing export, a training run given as one, a missing run folder or
    slot table only after importing torch (2.1-3.2 s on the loaded 2-core machine, 0.04-0.1 s without): through
    pretrain.export's (pretrain.slots') eager __init__, and --device's default parsed with torch. The reference is the
    refusal's message (exit status 2) and sys.modules of a fresh interpreter after it."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    for export, files in (("untokenized", ()), ("export", ("tokenizer.model",))):
        (tmp_path / export).mkdir()
        for name in ("config.json", "model.safetensors", *files):  # what the folder checks look for (empty:
            (tmp_path / export / name).touch()  # nothing reads them before torch)
    names = {"missing": tmp_path / "nope", "run": tmp_path / "run", "tmp": tmp_path}
    names.update(export=tmp_path / "export", untokenized=tmp_path / "untokenized")
    last, output = run_console_script(script, [a.format(**names) for a in args])
    assert message.format(**names) in output, output[-4000:]
    assert last == ["exit 2", "[]"], output[-4000:]


@pytest.mark.parametrize("script", ["memlayers-train", "memlayers-profile", "python -m pretrain.train"])
def test_a_refused_config_comes_before_torch_is_imported(script):
    """memlayers-train and memlayers-profile read the config only after importing the trainer and torch
    (2.5-3 s on the loaded 2-core machine, --help too for memlayers-train), pretrain/train.py at its
    top on purpose: its stop handler came first. pretrain/train_cli.py now installs the handler, parses
    and reads the config before pretrain.train is imported. The reference is the refusal (exit status 2)
    and sys.modules of a fresh interpreter after it."""
    overrides = ["--config", "configs/tiny.yaml", "model.dim=-3"]
    if script.startswith("python -m"):  # the sbatch templates' form
        code = (
            "import os, runpy, sys\n"
            "os._exit = sys.exit\n"
            f"sys.argv = ['pretrain.train', *{overrides!r}]\n"
            "try:\n"
            "    runpy.run_module('pretrain.train', run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    print('exit', e.code)\n"
            "print(sorted(m for m in ('torch', 'triton', 'deepspeed', 'webdataset') if m in sys.modules))\n"
        )
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        last, output = done.stdout.splitlines()[-2:], done.stdout + done.stderr
    else:
        last, output = run_console_script(script, overrides)
    assert "error: model.dim must be positive, got -3" in output, output[-4000:]
    assert last == ["exit 2", "[]"], output[-4000:]


def _third_party_imports(root: Path) -> dict[str, str]:
    """{top-level module: a file importing it} for the absolute imports of the project's Python files
    that are neither the standard library's nor the project's own, leaving out those inside a `try`
    that catches ImportError (optional: the code says what to install when they are missing)."""
    own = {"pretrain", "kernels", "tools", "memlayers_tools"}
    found: dict[str, str] = {}
    for path in sorted(p for folder in ("pretrain", "kernels", "tools") for p in (root / folder).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        optional = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                "ImportError" in ast.unparse(h.type or ast.Name("BaseException"))
                or "ModuleNotFoundError" in ast.unparse(h.type or ast.Name("BaseException"))
                for h in node.handlers
            ):
                optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in optional:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in own:
                    found.setdefault(top, str(path.relative_to(root)))
    return found


def test_every_third_party_import_is_a_declared_dependency():
    """A module the code imports is named in pyproject.toml (dependencies or an extra), not only reached
    through another package's dependencies: PyYAML, imported by pretrain/config/loading.py, came only
    with omegaconf, and an omegaconf release that dropped it would break config loading."""
    import importlib.metadata
    import re

    def normal(requirement: str) -> str:
        return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9._-]+", requirement).group(0)).lower()

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    declared = {normal(r) for r in project["dependencies"]}
    declared |= {normal(r) for extra in project["optional-dependencies"].values() for r in extra}
    distributions = importlib.metadata.packages_distributions()
    undeclared = []
    for module, where in sorted(_third_party_imports(REPO_ROOT).items()):
        names = {normal(d) for d in distributions.get(module, [])}
        if not names & declared:
            undeclared.append(f"{module} ({where}; distribution: {', '.join(sorted(names)) or 'not installed'})")
    assert not undeclared, "imported but not declared in pyproject.toml:\n" + "\n".join(undeclared)
