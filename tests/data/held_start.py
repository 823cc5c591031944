"""A module whose import holds a spawned worker in its start-up (spawn imports it to unpickle
`identity`), before the worker's own code runs: each such process writes `$HELD_START_GATE/<pid>`
and waits for `$HELD_START_GATE/go`. The test's own process (`$HELD_START_PARENT`) imports it freely."""

import os
import time
from pathlib import Path

if os.environ.get("HELD_START_GATE") and str(os.getpid()) != os.environ.get("HELD_START_PARENT"):
    _gate = Path(os.environ["HELD_START_GATE"])
    (_gate / str(os.getpid())).touch()
    while not (_gate / "go").exists():
        time.sleep(0.01)


def identity(item):
    return item
