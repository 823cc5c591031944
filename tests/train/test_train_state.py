"""TrainState / RankState (the declared checkpoint items) and the Every cadence."""

from __future__ import annotations

import pytest
import torch

from pretrain.cadence import Every
from pretrain.rng import RNGState
from pretrain.train_state import RankState, TrainState


@pytest.mark.parametrize("n,last", [(1, 7), (3, 10), (4, 12), (5, None)])
def test_every_matches_the_loops_old_condition(n, last):
    for step in range(1, 40):
        old = step % n == 0 or (last is not None and step == last)
        assert Every(n, last).due(step) == old, step


def test_train_state_round_trip_and_old_checkpoints():
    state = TrainState(step=7, tokens_seen=7 * 256, skipped_steps=1)
    restored = TrainState()
    restored.load_state_dict(dict(state.state_dict(), model_config={"dim": 32}))  # the client state holds more
    assert restored == state
    old = TrainState()
    fresh_id = old.run_id
    old.load_state_dict({"step": 3, "tokens_seen": 96})  # before skipped steps and run ids were saved
    assert (old.step, old.tokens_seen, old.skipped_steps, old.run_id) == (3, 96, 0, fresh_id)


def _run_ids(rank: int) -> list[str]:
    from pretrain.train_state import new_run_id

    resumed = TrainState()  # a ZeRO-3 checkpoint of before 2026-12-07: one id per rank's file
    resumed.load_state_dict({"step": 3, "tokens_seen": 96, "run_id": f"drawn-by-rank-{rank}"})
    return [new_run_id(), resumed.run_id]


def test_every_rank_holds_rank_0s_run_id(tmp_path):
    """Each rank drew its own run id, so a 2-rank ZeRO-3 checkpoint's model-states files carried two
    (bc813e71... and 591af703... in one); a new run's id and a resumed one are rank 0's on every rank."""
    from tests.train.helpers import run_ranks

    first, second = run_ranks(2, _run_ids, (), tmp_path)
    assert first == second
    assert len(first[0]) == 32 and first[1] == "drawn-by-rank-0"


class Counter:
    def __init__(self, n=0):
        self.n = n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


def test_rank_state_restores_every_item_and_rng():
    rank = RankState({"data": Counter(5), "rng": RNGState(), "slots": Counter(9)}, optional=("slots",))
    saved = rank.state_dict()
    expected = torch.rand(4)  # drawn after the save: the restored RNG must draw it again
    target = RankState({"data": Counter(), "rng": RNGState(), "slots": Counter()}, optional=("slots",))
    target.load_state_dict(saved)
    assert (target.items["data"].n, target.items["slots"].n) == (5, 9)
    assert torch.equal(torch.rand(4), expected)


def test_rank_state_optional_and_required_items():
    target = RankState({"data": Counter(), "slots": Counter(4)}, optional=("slots",))
    target.load_state_dict({"data": {"n": 2}})  # a checkpoint written without slot statistics
    assert (target.items["data"].n, target.items["slots"].n) == (2, 4)
    with pytest.raises(KeyError, match="'data'"):
        target.load_state_dict({"slots": {"n": 1}})


class FakeCuda:
    """Per-device CUDA generators as torch.cuda keeps them (`default_generators[index]`, which
    raises IndexError for a device this process does not see), here CPU generators: no GPU needed."""

    def __init__(self, devices: int, current: int):
        self.generators = [torch.Generator().manual_seed(100 + i) for i in range(devices)]
        self.current = current

    def index(self, device) -> int:
        return self.current if device == "cuda" else int(device)

    def get_rng_state(self, device="cuda"):
        return self.generators[self.index(device)].get_state()

    def set_rng_state(self, state, device="cuda"):
        self.generators[self.index(device)].set_state(state)  # IndexError past the devices seen

    def get_rng_state_all(self):
        return [g.get_state() for g in self.generators]

    def set_rng_state_all(self, states):
        for i, state in enumerate(states):
            self.set_rng_state(state, i)

    def install(self, monkeypatch):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))


def test_cuda_rng_resumes_on_a_node_with_fewer_gpus(monkeypatch):
    """Rank 0 of a run on 8-GPU nodes saved all 8 generators, and a resume of that checkpoint on
    one GPU (or a 4-GPU node) failed in torch.cuda.set_rng_state_all (IndexError). A rank keeps
    the generator of its own device only, and an old 8-entry state still loads."""
    saving = FakeCuda(devices=8, current=0)
    saving.install(monkeypatch)
    saved = RNGState().state_dict()
    own = saving.generators[0].get_state()
    old_format = dict(saved, cuda=saving.get_rng_state_all())  # what checkpoints held before
    for state in (saved, old_format):
        resuming = FakeCuda(devices=1, current=0)
        resuming.install(monkeypatch)
        RNGState().load_state_dict(state)
        assert torch.equal(resuming.generators[0].get_state(), own)
    # rank 1 of a 2-GPU node takes its own device's entry of an old state
    resuming = FakeCuda(devices=2, current=1)
    resuming.install(monkeypatch)
    RNGState().load_state_dict(old_format)
    assert torch.equal(resuming.generators[1].get_state(), saving.generators[1].get_state())


def test_a_rank_the_old_run_lacked_draws_its_own_stream():
    """A resume on more ranks: old ranks' generators are restored; a new rank's are seeded from
    (train.seed, rank, old world size), so two new ranks never draw the same numbers."""
    import random

    import numpy as np

    old = [RNGState(rank).state_dict() for rank in range(2)]
    draws = {}
    for rank in (2, 3):
        note = RNGState(rank, seed=7).load_resharded(old)
        assert note == f"RNG of new rank {rank} seeded afresh"
        draws[rank] = (random.random(), float(np.random.rand()), torch.rand(1).item())
        expected = int(np.random.SeedSequence([7, rank, 2]).generate_state(1)[0])
        assert draws[rank] == (
            random.Random(expected).random(),
            float(np.random.RandomState(expected).rand()),
            torch.rand(1, generator=torch.Generator().manual_seed(expected)).item(),
        )
    assert draws[2] != draws[3]
    assert RNGState(1, seed=7).load_resharded(old) == ""
    assert torch.equal(torch.get_rng_state(), old[1]["torch"])
