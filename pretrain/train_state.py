"""What a checkpoint records of the training run itself, beyond weights and optimizer states.

`TrainState` is the run-wide progress (identical on every rank), saved as DeepSpeed's
client state. `RankState` is the per-rank part (data loader position, RNG states, slot
counters), declared as named stateful items and saved as one file per rank.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Protocol

from pretrain.distributed import rank0_text


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Reshardable(Stateful, Protocol):
    """A per-rank item that can continue from the states of all ranks of a run with another world size."""

    def load_resharded(self, states: list[dict]) -> str | None: ...


@dataclass
class TrainState:
    """Steps completed, tokens trained on, updates skipped, and the run's id (kept across resumes).

    `tokens_seen`: train.global_batch x data.seq_len positions per step whose update was applied
    (what the exported model card calls tokens seen), padding included, as throughput and MFU
    count them; the slot table's num_tokens counts the input tokens read, padding excluded, so it
    is at most this (614,184 against 614,400 after 300 steps of a tiny run). A skipped step's batch
    is drawn from the data (the loader moves past it, and data/tokens_seen/<source> counts it) but
    adds nothing. Checkpoints before 2026-12-07 counted skipped steps too.

    `run_id` is rank 0's on every rank, drawn once (`new_run_id`) and adopted from rank 0 on a
    resume: ZeRO-3 saves one client state per rank, and until 2026-12-07 each rank drew its own,
    so those files disagreed (the slot tables and exports carry rank 0's)."""

    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # names the run's slot tables and exports

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_steps = state.get("skipped_steps", 0)  # checkpoints before skipped steps were counted
        self.run_id = rank0_text(state.get("run_id", self.run_id))  # checkpoints before run ids: a new one


def new_run_id() -> str:
    """A fresh run id, the same on every rank (rank 0's, broadcast: every rank must call it)."""
    return rank0_text(uuid.uuid4().hex)


class RankState:
    """This rank's stateful items by name; optional ones may be missing from older checkpoints."""

    def __init__(self, items: dict[str, Reshardable], optional: tuple[str, ...] = ()):
        self.items, self.optional = items, set(optional)

    def state_dict(self) -> dict:
        return {name: item.state_dict() for name, item in self.items.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, item in self.items.items():
            if name in state:
                item.load_state_dict(state[name])
            elif name not in self.optional:
                raise KeyError(f"the per-rank checkpoint state has no {name!r} (it has {sorted(state)})")

    def needs_reshard(self, state: dict) -> bool:
        """True if an item cannot continue from this rank's `state` alone (the data layout changed)."""
        return any(
            hasattr(item, "needs_reshard") and name in state and item.needs_reshard(state[name])
            for name, item in self.items.items()
        )

    def load_resharded(self, states: list[dict]) -> str:
        """Continue from the per-rank states of a run with another number of ranks (all of them,
        in rank order): each item merges them by its `load_resharded(list)`, which returns a
        line saying what it did. Returns those lines joined."""
        lines = []
        for name, item in self.items.items():
            present = [state[name] for state in states if name in state]
            if not present:
                if name not in self.optional:
                    raise KeyError(f"the per-rank checkpoint states have no {name!r}")
                continue
            if len(present) != len(states):
                raise KeyError(f"only {len(present)} of the {len(states)} per-rank checkpoint states have {name!r}")
            lines.append(item.load_resharded(present))
        return "; ".join(line for line in lines if line)
