"""run_gloo's ranks fork from a server that imported torch and DeepSpeed once: they must still
start with the caller's environment of the moment, and DeepSpeed's accelerator of the moment."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pretrain import spawn


def _environment(rank: int, world: int, out_dir: str) -> None:
    from deepspeed.accelerator import get_accelerator

    seen = {k: os.environ.get(k) for k in ("MEMLAYERS_SPAWN_PROBE", "MEMLAYERS_SPAWN_GONE", "RANK", "WORLD_SIZE")}
    seen["accelerator"] = get_accelerator().device_name()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))


def test_ranks_start_with_the_callers_environment_of_the_moment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMLAYERS_SPAWN_GONE", "set when the first ranks started")
    spawn.run_gloo(_environment, 1, str(tmp_path))  # the fork server runs from here on (if not before)
    monkeypatch.setenv("MEMLAYERS_SPAWN_PROBE", "set after the fork server started")
    monkeypatch.delenv("MEMLAYERS_SPAWN_GONE")
    spawn.run_gloo(_environment, 2, str(tmp_path))
    for rank in range(2):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {
            "MEMLAYERS_SPAWN_PROBE": "set after the fork server started",
            "MEMLAYERS_SPAWN_GONE": None,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "accelerator": "cpu",
        }


def test_a_changed_accelerator_starts_fresh_interpreters(monkeypatch):
    """DeepSpeed fixes its accelerator when imported: the fork server's import is only reused
    under the DS_ACCELERATOR (and TRITON_INTERPRET) it was made under."""
    monkeypatch.setattr(spawn, "_server_env", [("cpu", None)])
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert spawn._start_method() == "forkserver"
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert spawn._start_method() == "spawn"
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert spawn._start_method() == "spawn"
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.delenv("DS_ACCELERATOR")  # each rank sets cpu before importing DeepSpeed
    assert spawn._start_method() == "spawn"
