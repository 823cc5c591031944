"""When a periodic component is due: every n steps, and at the run's last step."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Every:
    """Due after step counts divisible by `n`, and at `last` (the final step) if given."""

    n: int
    last: int | None = None

    def due(self, step: int) -> bool:
        return step % self.n == 0 or step == self.last
