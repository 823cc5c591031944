"""What torchrun's agent tells a worker about its restarts (`torchrun --max-restarts=N`), in the words of
the log lines that say what happens next: after a rank is lost, the agent stops every rank and starts
them again, at most N times, and the run resumes from its latest complete checkpoint by itself.

torchrun sets TORCHELASTIC_RESTART_COUNT (restarts before this attempt) and TORCHELASTIC_MAX_RESTARTS
in every worker's environment; the standard library only, so that the command line's first checks,
before torch is imported, can use it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Restarts:
    done: int  # restarts before this attempt (0: the first start)
    allowed: int  # --max-restarts

    @property
    def left(self) -> int:
        return max(0, self.allowed - self.done)

    def option(self) -> str:
        return f"--max-restarts={self.allowed}"


def torchrun_restarts(environ: Mapping[str, str] | None = None) -> Restarts | None:
    """This worker's restarts, where torchrun started it (None otherwise, or where the numbers are unreadable)."""
    environ = os.environ if environ is None else environ
    try:
        return Restarts(int(environ["TORCHELASTIC_RESTART_COUNT"]), int(environ["TORCHELASTIC_MAX_RESTARTS"]))
    except (KeyError, ValueError):
        return None


def restarted_now(environ: Mapping[str, str] | None = None) -> str | None:
    """How a rank that ended now is followed, where torchrun restarts every rank (a restart left):
    'torchrun restarts every rank now (restart 1 of --max-restarts=3)'; None where it does not."""
    restarts = torchrun_restarts(environ)
    if restarts is None or not restarts.left:
        return None
    return f"torchrun restarts every rank now (restart {restarts.done + 1} of {restarts.option()})"


def restarts_used(environ: Mapping[str, str] | None = None) -> str | None:
    """'torchrun has used its --max-restarts=3' where it had some and none is left; None otherwise."""
    restarts = torchrun_restarts(environ)
    if restarts is None or not restarts.allowed or restarts.left:
        return None
    return f"torchrun has used its {restarts.option()}"


def this_attempt(environ: Mapping[str, str] | None = None) -> str | None:
    """'torchrun restart 2 of --max-restarts=3' in an attempt torchrun restarted; None in a first start."""
    restarts = torchrun_restarts(environ)
    if restarts is None or not restarts.done:
        return None
    return f"torchrun restart {restarts.done} of {restarts.option()}"


def repeats_on_restart(environ: Mapping[str, str] | None = None) -> str | None:
    """The note after a refusal (a config, data or checkpoint error, running out of memory, a diverged
    run), where torchrun will restart the ranks into it: a restart resumes from the same checkpoint with
    the same config and data, and so meets it again, each time after the steps since that checkpoint."""
    restarts = torchrun_restarts(environ)
    if restarts is None or not restarts.left:
        return None
    more = "once more" if restarts.left == 1 else f"{restarts.left} more times"
    return (
        f"note: torchrun ({restarts.option()}) restarts every rank {more}, and a restart resumes from the same "
        "checkpoint with the same config and data, so it most likely stops here again: a restart does not mend "
        "this. Stop torchrun (Ctrl-C) and fix it, then start torchrun again as before"
    )
