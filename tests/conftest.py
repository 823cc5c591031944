"""Shared test fixtures: the repository root, small model configurations, process isolation."""

from __future__ import annotations

import copy
import os
import shutil
import signal
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
# DeepSpeed JIT-builds a small comm op on first init (~40 s); the cache makes it once per machine.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/memlayers/torch_extensions"))
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_LAUNCH_ENV_AT_START = {k: os.environ[k] for k in _LAUNCH_VARS if k in os.environ}
# A suite started in the background (`make test &`, a CI runner's `nohup ... &`) inherits SIGINT
# ignored, and Python keeps it so, in this process and the tools the tests start; the tests of Ctrl-C
# play a user at a terminal's foreground job, so SIGINT is Python's default here, as it is there.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

from tests import triton_mode  # noqa: E402

triton_mode.load_interpreted_before_collection()  # before any test module's transformers import loads triton compiled

from pretrain.model.config import MemoryConfig, ModelConfig  # noqa: E402 (after the environment defaults)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def cpu_ops_built() -> None:
    """The compiled CPU ops (kernels/csrc) must build wherever a C++ compiler exists (CI has one:
    DeepSpeed's ops need it too); only a machine without any compiler skips the test."""
    from kernels import cpu_ops

    if cpu_ops.available():
        return
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the CPU path runs on torch ops")
    pytest.fail("kernels/csrc did not build although a C++ compiler exists (the warning above says why)")


@pytest.fixture
def make_model_config():
    """Factory for a small, valid ModelConfig; keyword overrides, `memory=dict(...)` for memory fields."""

    def make(memory: dict | None = None, **overrides) -> ModelConfig:
        mem = MemoryConfig(layers=[1], n_keys=8, heads=2, k=3, k_dim=8)
        for key, value in (memory or {}).items():
            setattr(mem, key, copy.deepcopy(value))
        base = dict(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=32, memory=mem)
        base.update(overrides)
        return ModelConfig(**base)

    return make


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tiny embedded dataset shared by the trainer and export tests."""
    from pretrain.data import prepare_embedded_dataset
    from tests.train.helpers import tiny_config

    cache = tmp_path_factory.mktemp("data-cache")
    cfg = tiny_config(cache / "unused", cache)
    prepare_embedded_dataset(cfg.data, cfg.data.seq_len, show_progress=False)
    return cache


@pytest.fixture(autouse=True)
def isolated_launch_environment():
    """Tests that train in-process set RANK/MASTER_PORT/...; remove them afterwards so later
    tests (and Slurm jobs they submit, which inherit the environment) start clean. The
    world-1 process group itself stays: DeepSpeed caches it and cannot be re-initialised."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    for key in _LAUNCH_VARS:  # also what a session-scoped fixture's in-process run left behind
        os.environ.pop(key, None)
    os.environ.update(_LAUNCH_ENV_AT_START)


@pytest.fixture
def without_process_group(monkeypatch):
    """Behave as a process where torch.distributed was never initialised (even if an
    earlier in-process training run initialised a world-1 group)."""
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
