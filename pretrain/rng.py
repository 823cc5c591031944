"""The process's random generators (Python's, NumPy's, torch's and this rank's CUDA one): seed
them all from one number, and save and restore their states as a checkpoint item (`RNGState`)."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed every generator the run draws from; NumPy takes the seed modulo 2**32."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device: the generator it draws from
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):
            # checkpoints that saved every visible device's generator: take this rank's device's,
            # where the saving process saw it (a node with fewer GPUs sees fewer)
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


class RNGState:
    """The process's RNG states as a checkpoint item (`rng_state` / `set_rng_state`)."""

    def __init__(self, rank: int = 0, seed: int = 0):
        self.rank, self.seed = rank, seed

    def state_dict(self) -> dict:
        return rng_state()

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state)

    def load_resharded(self, states: list[dict]) -> str:
        """Rank r keeps old rank r's generators; a rank the old run did not have gets fresh ones,
        seeded by (train.seed, rank, old world size) so that no two ranks share a stream."""
        if self.rank < len(states):
            set_rng_state(states[self.rank])
            return ""
        seed_everything(int(np.random.SeedSequence([self.seed, self.rank, len(states)]).generate_state(1)[0]))
        return f"RNG of new rank {self.rank} seeded afresh"


def _to_tuple(value):
    return tuple(_to_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
