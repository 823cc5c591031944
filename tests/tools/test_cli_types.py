"""pretrain/cli.py: the argparse types the tools share, and that no tool keeps its own copy."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from pretrain.cli import positive_int

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
    for name in ("generate", "memlayers_eval", "train_tokenizer", "perplexity"):
        assert importlib.import_module(f"tools.{name}").positive_int is positive_int
    assert [p.name for p in TOOLS.glob("*.py") if "def positive_int" in p.read_text()] == []
