"""A ShardLoader's saved state: its version and work scheme, its plan read back, the settings a
resumed run must share with the run that saved, and every reader of a saved run, which
`ShardLoader.load_resharded` shares out among new ranks and workers."""

from __future__ import annotations

from typing import NamedTuple

from pretrain.data.errors import DataError
from pretrain.data.work_plan import ROWS, SHARDS

STATE_VERSION = 3  # 3 split rows across readers ("scheme"); 2 added "plan" (after load_resharded); 1 and 2 still load


RESHARD_FIX = (
    "a run saved on another number of ranks or workers continues with load_resharded and the states of all its ranks"
)
_DATA_KEYS = ("split", "seed", "shards")  # what a resharded run must share with the run that saved
LAYOUT_KEYS = ("world_size", "workers", "batch_size", "shuffle_buffer")  # what it may change


def check_same_settings(saved: dict, now: dict, what: str, fix: str) -> None:
    """Refuse a saved state whose settings differ from `now`: each key with its saved and current value, and `fix`."""
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        raise DataError(
            f"the saved {what} was made with other settings (saved, now): "
            + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
            + f"; {fix}"
        )


class SavedConsumer(NamedTuple):
    """One consumer of a saved run: its rank's settings and plan, its worker index and position."""

    settings: dict
    plan: dict | None
    scheme: str
    worker: int
    position: list[int]


def check_version(state: dict) -> None:
    if state.get("version") not in (1, 2, STATE_VERSION):
        raise DataError(f"loader state version {state.get('version')!r} is not 1, 2 or {STATE_VERSION}")


def scheme_of(state: dict) -> str:
    """The work split `state` continues: whole shards for versions 1 and 2 (pretrain/data/loader.py's docstring)."""
    scheme = state.get("scheme") if state.get("version") == STATE_VERSION else SHARDS
    if scheme not in (ROWS, SHARDS):
        raise DataError(f"loader state scheme {scheme!r} is not {ROWS!r} or {SHARDS!r}")
    return scheme


def copy_plan(plan: dict | None, sizes: list[int]) -> dict | None:
    """A plan with ints; a version-2 plan's pieces [shard, first row] run to the shard's end."""
    if plan is None:
        return None
    work = [[[int(k), int(r), int(rest[0]) if rest else sizes[int(k)]] for k, r, *rest in w] for w in plan["work"]]
    return {"epoch": int(plan["epoch"]), "work": work}


def saved_consumers(states: list[dict], now: dict, sizes: list[int]) -> list[SavedConsumer]:
    """Every consumer of a saved run, in consumer order; refuses an incomplete run or other data."""
    if not states:
        raise DataError("load_resharded needs the loader states of all ranks of the saved run, got none")
    world = states[0].get("settings", {}).get("world_size")
    if [s.get("settings", {}).get("rank") for s in states] != list(range(len(states))) or world != len(states):
        raise DataError(
            f"load_resharded needs the loader states of all {world} ranks of the saved run in rank order, got ranks "
            f"{[s.get('settings', {}).get('rank') for s in states]}: pass every rank's state"
        )
    fix = "a run continues on other ranks only with the same dataset, split and seed: use those, or start a new run"
    out = []
    for state in states:
        check_version(state)
        settings = state["settings"]
        check_same_settings(settings, {k: now[k] for k in _DATA_KEYS}, "loader state", fix)
        plan, scheme = copy_plan(state.get("plan"), sizes), scheme_of(state)
        out += [SavedConsumer(settings, plan, scheme, w, list(map(int, p))) for w, p in enumerate(state["positions"])]
    return out


def summed(dicts) -> dict:
    total: dict = {}
    for d in dicts:
        for k, v in d.items():
            total[k] = total.get(k, 0) + v
    return total
