"""The "Train on your own text" recipe (docs/own-corpus.md, between its recipe markers), run command by
command as written, on the real English text that ships with the machine; then the trained runs are checked."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# Appended to the recipe's training commands only: a few small steps instead of 200.
QUICK_TRAINING = [
    "train.max_steps=16",
    "train.micro_batch=4",
    "train.global_batch=4",
    "train.log_every=1",
    "train.eval_every=16",
    "train.eval_batches=2",
    "optim.warmup_steps=2",
]


RECIPE = "docs/own-corpus.md"


def recipe_commands() -> list[list[str]]:
    text = (REPO_ROOT / RECIPE).read_text()
    assert "<!-- recipe:begin -->" in text and "<!-- recipe:end -->" in text, f"{RECIPE} lost its recipe markers"
    block = text.split("<!-- recipe:begin -->", 1)[1].split("<!-- recipe:end -->", 1)[0]
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("python ")]
    assert len(commands) >= 8, "the recipe lost its commands"
    return commands


def run(argv: list[str], cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, *argv[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


PERPLEXITY = "tools/perplexity.py"


def split_loss(out: str) -> float:
    """The loss tools/perplexity.py prints for a split."""
    return float(re.search(r"\(val\): loss (\d+\.\d+)", out).group(1))


def losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r"step \d+/\d+ loss (\S+)", log)]


@pytest.mark.slow
def test_own_text_recipe_trains_exports_and_generates(tmp_path):
    for folder in ("tools", "configs"):  # the commands are written for the repository root
        (tmp_path / folder).symlink_to(REPO_ROOT / folder)
    outputs = []
    for argv in recipe_commands():
        if argv[1:3] == ["-m", "pretrain.train"]:
            argv = argv + QUICK_TRAINING
        outputs.append((argv, run(argv, tmp_path)))
    trainings = [out for argv, out in outputs if argv[1:3] == ["-m", "pretrain.train"]]
    assert len(trainings) == 3
    for log in trainings[:2]:  # from scratch: the loss falls from ln(4096) = 8.3
        steps = losses(log)
        assert sum(steps[-4:]) / 4 < sum(steps[:4]) / 4 - 0.3, steps
    for log in trainings:
        assert len(losses(log)) == 16
        assert re.search(r"eval val_loss \d+\.\d+ val_perplexity", log)
        assert "no probes.jsonl" in log and "fact_recall" not in log
        assert "tokenizer 4096 tokens, model.vocab_size 4096" in log
    assert re.search(r"val_loss/pydocs \d", trainings[1]) and re.search(r"val_loss/licenses \d", trainings[1])
    # continued pretraining starts where the export ended, not at ln(4096) = 8.3
    assert "initialised from exports/english (exported at step 16)" in trainings[2]
    assert losses(trainings[2])[0] < losses(trainings[0])[0] - 0.3, (losses(trainings[0]), losses(trainings[2]))
    assert re.search(r"eval val_loss \d+\.\d+ val_perplexity \d+\.\d+ heldout_loss/pydocs \d+\.\d+", trainings[2])
    scored = [out for argv, out in outputs if argv[1] == PERPLEXITY]
    assert len(scored) == 4
    for out in scored:
        assert re.search(r"on data/\w+ \(val\): loss \d+\.\d+ perplexity \d+\.\d+ over [\d,]+ tokens", out), out
    # continued pretraining learns the licenses: scored on their whole validation split (fixed rows, not the
    # per-step losses of 4 rows, which jump by 1.3 from one license to another), the licenses export is
    # below the English one it started from (measured 6.60 against 7.13)
    english, licenses = (
        next(out for argv, out in outputs if argv[1:] == [PERPLEXITY, e, "--data", "data/licenses"])
        for e in ("exports/english", "exports/licenses")
    )
    assert split_loss(licenses) < split_loss(english) - 0.3, (english, licenses)
    inspected = next(out for argv, out in outputs if argv[1] == "tools/inspect_data.py")
    assert re.search(r"train: [\d,]+ rows of 128 \+ 1 tokens, [\d,]+ tokens", inspected), inspected
    assert "byte-fallback tokens: " in inspected and "--- row 0 ---" in inspected and "warning" not in inspected
    generated = next(out for argv, out in outputs if argv[1] == "tools/generate.py")
    # something after the prompt: after 16 steps often newlines only (the commonest token: the tokenizer keeps them)
    assert generated.startswith("The license") and len(generated) > len("The license\n")
    assert (tmp_path / "exports/english/model.safetensors").is_file()


def recipe_outputs() -> set[str]:
    """The paths the recipe writes, relative to the repository root: each --output, train.run_dir and
    export folder (tools/export.py RUN OUT)."""
    out = set()
    for argv in recipe_commands():
        out |= {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--output"}
        out |= {a.split("=", 1)[1] for a in argv if a.startswith("train.run_dir=")}
        if argv[1] == "tools/export.py":
            out.add(argv[3])
    return out


def test_the_recipes_outputs_are_git_ignored():
    """Run from the checkout as written, the recipe leaves nothing for `git status` to show: its
    corpus/ and data/ were untracked (1.3 MB after its first block), next to its ignored runs/ and exports/."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = sorted(recipe_outputs())
    assert {"corpus/english.jsonl", "data/english", "runs/english", "exports/english"} <= set(outputs)
    assert not_ignored(outputs) == [], "the recipe writes paths that .gitignore does not cover"
    source = ["pretrain/data/new.py", "tests/data/new.py"]  # the package's own data folders stay tracked
    assert not_ignored(source) == source


def not_ignored(paths: list[str]) -> list[str]:
    """Those of `paths` (relative to the repository root, existing or not) that .gitignore does not cover."""
    check = subprocess.run(
        ["git", "check-ignore", "--no-index", "--verbose", "--non-matching", *paths],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert check.returncode in (0, 1), check.stderr
    return [line.split("\t", 1)[1] for line in check.stdout.splitlines() if line.startswith("::")]
