"""tools/gpu_check.sh: every stage's command parses and its config overrides load, on CPU.

A GPU session is short and rare; a stage that dies on an option renamed since the script was
last run (or a config key that moved) would cost it. Each command is read from the script as
written, its arguments are parsed by the tool's own parser (stopping right after parsing,
before any work), and every config it would train loads with its overrides.
"""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

from pretrain.config import load_config

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "tools" / "gpu_check.sh"


def stage_commands(work: Path) -> dict[str, list[str]]:
    """{stage name: its command's words} for every `want NAME && stage NAME ...` line, with the
    script's variables set to their defaults and the result folders to `work`."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    commands = {}
    for line in text.splitlines():
        found = re.match(r"\s*want (\w+) && stage \1 \S+ \S+ (.*)$", line)
        if not found:
            continue
        command = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", found.group(2))  # ${TRAIN373_S:-240} -> 240
        command = command.replace('"${XDIST[@]}"', "").replace("$RESULTS", str(work)).replace("$WORK", str(work))
        assert "$" not in command, f"unexpanded variable in the {found.group(1)} stage: {command}"
        commands[found.group(1)] = shlex.split(command)
    return commands


def parse_only(module, argv: list[str]) -> argparse.Namespace:
    """The namespace `module.main(argv)` parses, without running the tool: through the tool's own
    `parse_args` where it has one (so the checks it makes after argparse's run too), else its parser."""
    if hasattr(module, "parse_args"):
        return module.parse_args(argv)
    return module.build_parser().parse_args(argv)


def test_every_default_stage_exists():
    text = SCRIPT.read_text()
    default = re.search(r'STAGES=" \$\{STAGES:-([^}]*)\} "', text).group(1).split()
    assert default and set(default) <= set(stage_commands(Path("/tmp")))


def test_every_stage_command_parses_and_its_configs_load(tmp_path):
    commands = stage_commands(tmp_path)
    assert {"bench", "train373", "layer", "profile", "train1p3b", "tests", "train"} <= set(commands)
    checked = []
    for name, words in commands.items():
        assert words[0] == "python3", f"{name}: {words}"
        if words[1:3] == ["-m", "pytest"]:
            assert all((REPO_ROOT / w).exists() for w in words if w.startswith("tests/")), name
        elif words[1:3] == ["-m", "pretrain.train"]:
            assert words[3] == "--config"
            load_config(REPO_ROOT / words[4], words[5:])
        else:
            tool = Path(words[1])
            assert tool.parent.name == "tools" and (REPO_ROOT / tool).is_file(), f"{name}: {words[1]}"
            module = importlib.import_module(f"tools.{tool.stem}")
            args = parse_only(module, words[2:])
            if tool.stem == "bench_train":  # every variant's config, with the stage's overrides
                for variant in module.variants(args):
                    values = [f"optim.value_optimizer={variant['values']}"] if variant["values"] else []
                    load_config(REPO_ROOT / variant["config"], [*args.overrides, *values])
            elif tool.stem == "profile":
                load_config(REPO_ROOT / args.config, args.overrides)
            elif tool.stem == "bench_kernels" and args.layer:
                load_config(REPO_ROOT / args.layer)
        checked.append(name)
    assert len(checked) == len(commands)


def test_the_values_stage_pools_fit_the_smallest_gpu(tmp_path):
    """The values stage builds every variant of one N side by side; each N's pools must fit the
    H100 the device tool lends first (about 78 GiB), with room for the step's temporaries
    (bench_values refuses the run otherwise, naming --n-keys and --variants)."""
    from pretrain.bench.values import StepSpec, pool_bytes

    module = importlib.import_module("tools.bench_values")
    args = parse_only(module, stage_commands(tmp_path)["values"][2:])
    spec = StepSpec(v_dim=args.v_dim, dense_max_slots=args.dense_max_slots, variants=tuple(args.variants.split(",")))
    for n in (int(x) for x in args.n_keys.split(",")):
        assert pool_bytes(spec, n) < 70 * 2**30, f"--n-keys {n}: {pool_bytes(spec, n) / 2**30:.1f} GiB"
