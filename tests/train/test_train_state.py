"""TrainState / RankState (the declared checkpoint items) and the Every cadence."""

from __future__ import annotations

import pytest
import torch

from pretrain.cadence import Every
from pretrain.checkpoint import RNGState
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
