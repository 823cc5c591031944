"""Which forward is running: the real one, or an activation checkpoint's recomputation.

Activation checkpointing (pretrain/parallel/activation_checkpointing.py) runs a block's
forward twice: once for real, once more during backward to rebuild the tensors autograd
needs. Two things in a memory layer must happen exactly once per real forward:
  * handing the slot indices to their readers (slot statistics would count twice), and
  * the memory-parallel collectives (P > 1): a recomputed all-gather/all-to-all would
    pair up with whatever the other ranks of the group run at that moment.
Each checkpointed region gets a `LookupTape`. While the real forward runs, the tape
records what the value lookups produced; while the recomputation runs, the tape
replays those tensors in the same order instead of communicating again, and
`recomputing()` is true so that hand-overs are skipped. Outside checkpointing there is
no tape and nothing changes.
"""

from __future__ import annotations

import contextlib
from collections import deque


class LookupTape:
    """The value lookups of one checkpointed region, recorded on the real forward."""

    def __init__(self):
        self.entries: deque = deque()
        self.replaying = False

    def record(self, entry) -> None:
        self.entries.append(entry)

    def replay(self):
        if not self.entries:
            raise RuntimeError(
                "activation checkpointing: the recomputed forward ran more value lookups than "
                "the real one (the block's forward must be deterministic in its control flow)"
            )
        return self.entries.popleft()

    @contextlib.contextmanager
    def recording(self):
        with _active(self, replaying=False):
            yield

    @contextlib.contextmanager
    def replaying_context(self):
        with _active(self, replaying=True):
            yield


class _State:
    tape: LookupTape | None = None


_STATE = _State()


@contextlib.contextmanager
def _active(tape: LookupTape, replaying: bool):
    previous, previous_mode = _STATE.tape, tape.replaying
    _STATE.tape, tape.replaying = tape, replaying
    try:
        yield
    finally:
        _STATE.tape, tape.replaying = previous, previous_mode


def current_tape() -> LookupTape | None:
    """The tape of the checkpointed region now running (None outside checkpointing)."""
    return _STATE.tape


def recomputing() -> bool:
    """True while an activation checkpoint recomputes its region during backward."""
    tape = _STATE.tape
    return tape is not None and tape.replaying
