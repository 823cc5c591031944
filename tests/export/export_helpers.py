"""Shared pieces of the export tests: a tiny run that records the training model's logits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.train.helpers import tiny_config

# 2 steps, tiny shapes; vocab 384 fits the embedded corpus' characters.
OVERRIDES = ["data.vocab_size=384", "model.vocab_size=384", "train.max_steps=2", "train.eval_every=1000"]
LOGITS = "train_logits.safetensors"


def config(run_dir: Path, cache: Path, *overrides: str, parallel_size: int = 1):
    cfg = tiny_config(Path(run_dir), Path(cache), *OVERRIDES, *overrides)
    # set after load_config: the world-size check belongs to the launched run
    cfg.model.memory.parallel_size = parallel_size
    return cfg


def fixed_tokens(vocab: int = 384, batch: int = 2, length: int = 32) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1234))


def train_and_record(rank: int, run_dir: str, cache: str, overrides: list[str], parallel_size: int = 1) -> dict:
    """train(), then the logits of the trained DeepSpeed engine (dense part + value shards) on
    `fixed_tokens()`, saved by rank 0 as <run_dir>/train_logits.safetensors."""
    import deepspeed
    import pytest

    import pretrain.train as train_module

    engines = []
    real_initialize = deepspeed.initialize

    def capture(*args, **kwargs):
        out = real_initialize(*args, **kwargs)
        engines.append(out[0])
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(deepspeed, "initialize", capture)
        result = train_module.train(config(Path(run_dir), Path(cache), *overrides, parallel_size=parallel_size))
    engine = engines[-1]
    engine.eval()
    with torch.no_grad():
        logits = engine(fixed_tokens()).float()
    if rank == 0:
        save_file({"logits": logits.contiguous()}, str(Path(run_dir) / LOGITS))
    return {"step": result.step}


def training_logits(run_dir: Path) -> torch.Tensor:
    return load_file(str(Path(run_dir) / LOGITS))["logits"]


def run_transformers_offline(script: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -c script *args` in a fresh process in `tmp_path`, as a transformers user runs it:
    no PYTHONPATH, the Hugging Face hub offline, an empty HF_HOME under `tmp_path`."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf-home"))
    return subprocess.run(
        [sys.executable, "-c", script, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )


def assert_relative_close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> None:
    """max |got - want| <= rtol * max |want| (the acceptance criterion, relative to the logit scale)."""
    assert got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    scale = want.float().abs().max().item()
    assert err <= rtol * scale, f"max abs error {err:.3e} exceeds {rtol} x max |logit| {scale:.3e}"


class OracleModel(torch.nn.Module):
    """Predicts the next token of whichever known sequence the context is a prefix of."""

    def __init__(self, sequences: list[list[int]], vocab: int, max_seq_len: int = 256):
        super().__init__()
        self.sequences, self.vocab = sequences, vocab
        self.cfg = type("Cfg", (), {"max_seq_len": max_seq_len})()
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, tokens):
        context = tokens[0].tolist()
        logits = torch.zeros(1, len(context), self.vocab)
        for seq in self.sequences:
            if seq[: len(context)] == context and len(seq) > len(context):
                logits[0, -1, seq[len(context)]] = 10.0
        return logits
