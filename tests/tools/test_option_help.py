"""Every option of every command (tools/*.py, memlayers-train, memlayers-demo) has help text: a walk
through the docs found `memlayers-perplexity --split` listed by --help with nothing beside it (93 options
of 24 tools had none)."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOLS = sorted(p.stem for p in (REPO / "tools").glob("*.py") if "def build_parser" in p.read_text())
COMMANDS = [f"tools.{name}" for name in TOOLS] + ["pretrain.train_cli", "pretrain.demo"]


def options_without_help(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += options_without_help(sub, f"{prefix}{name} ")
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            missing.append(prefix + ("/".join(action.option_strings) or action.dest))
    return missing


def test_every_tool_is_covered():
    assert len(TOOLS) >= 30 and {"perplexity", "prepare_data", "tfidf", "export"} <= set(TOOLS)


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_has_help(module):
    parser = importlib.import_module(module).build_parser()
    assert options_without_help(parser) == [], f"{module}: options without help text"
