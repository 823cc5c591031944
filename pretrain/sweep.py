"""Hyper-parameter sweeps for memlayers-submit: `--sweep KEY=V1,V2,...` (repeatable) becomes
the Cartesian product of the values, one run (and one Slurm job) each, in a sub-directory of
train.run_dir named after the swept values (`lr=1e-3_seed=0`; the whole keys where two end in
the same name).

This module only expands and checks the specifications; tools/submit.py validates every run
of the sweep (pretrain.launch.plan_run) before the first job is queued, and records the runs
and their job ids in `<train.run_dir>/sweep.json`.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

from pretrain.files import atomic_write

SWEEP_FILE = "sweep.json"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+$")
_VALUE = re.compile(r"^[A-Za-z0-9_.+-]+$")  # numbers, names, booleans: safe as one path component


class SweepError(ValueError):
    """A --sweep specification that cannot be expanded (names the option and the fix)."""


@dataclass(frozen=True)
class SweepRun:
    name: str  # the sub-directory: "lr=1e-3_seed=0"
    overrides: tuple[str, ...]  # "optim.lr=1e-3", "train.seed=0"


def parse_sweep(specs: list[str]) -> list[SweepRun]:
    """Every combination of the `KEY=V1,V2,...` specifications, the first key varying slowest."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs:
        key, sep, values_text = spec.partition("=")
        if not sep or not _KEY.match(key):
            raise SweepError(f"--sweep {spec!r}: write it as a dotted config key and values, e.g. optim.lr=1e-3,3e-3")
        if key == "train.run_dir":
            raise SweepError("--sweep train.run_dir: the sweep names each run's directory under train.run_dir itself")
        if key in (k for k, _ in axes):
            raise SweepError(f"--sweep {key} is given twice: list all its values in one --sweep {key}=A,B")
        values = values_text.split(",")
        bad = [v for v in values if not _VALUE.match(v)]
        if bad:
            raise SweepError(
                f"--sweep {spec!r}: value {bad[0]!r} is not a plain number or name (letters, digits, . _ + -); "
                "values are split at commas, so lists and quoted strings cannot be swept"
            )
        repeated = _repeated_value(key, values)
        if repeated:
            raise SweepError(f"--sweep {spec!r} repeats a value: {repeated[0]} and {repeated[1]} are the same setting")
        axes.append((key, values))
    short = [key.rsplit(".", 1)[1] for key, _ in axes]
    labels = short if len(set(short)) == len(short) else [key for key, _ in axes]  # optim.lr vs model.lr
    runs = []
    for combo in itertools.product(*(values for _, values in axes)):
        name = "_".join(f"{label}={value}" for label, value in zip(labels, combo))
        overrides = tuple(f"{key}={value}" for (key, _), value in zip(axes, combo))
        runs.append(SweepRun(name=name, overrides=overrides))
    return runs


def _repeated_value(key: str, values: list[str]) -> tuple[str, str] | None:
    """Two of `values` that set `key` alike, as the config reads them ('07' and '7', '1e-3' and
    '0.001', 1 and 1.0): two runs, two jobs, one experiment."""
    from pretrain.config import ConfigError, override_value

    seen: dict[object, str] = {}
    for text in values:
        try:
            value = override_value(f"{key}={text}")
        except ConfigError:  # an unknown key or bad value: plan_run names it for every run
            value = text
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)  # a float key reads 1 as 1.0
        if value in seen:
            return seen[value], text
        seen[value] = text
    return None


def read_sweep_record(base: Path) -> list[dict]:
    """The runs `base/sweep.json` lists already ([] without one), read before anything is queued so
    that a record that cannot be extended stops the sweep then, not after its jobs are queued."""
    path = base / SWEEP_FILE
    if not path.exists():
        return []
    try:
        runs = json.loads(path.read_text())["runs"]
        if not isinstance(runs, list) or not all(
            isinstance(r, dict) and isinstance(r.get("run_dir"), str) for r in runs
        ):
            raise TypeError("runs must be a list of objects with a run_dir")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SweepError(
            f"{path} is not a sweep record this tool can add to ({err}): move it aside, or choose another train.run_dir"
        ) from None
    return runs


def write_sweep_record(base: Path, entries: list[dict], previous: list[dict] = ()) -> Path:
    """`base/sweep.json`: each run's directory, overrides and Slurm job id. `previous`: the runs it
    listed before (read_sweep_record): kept, an entry of the same run directory replaced in place, so
    that a second sweep under the same train.run_dir, or a --resume, keeps the record of every run."""
    new = {e["run_dir"]: e for e in entries}
    runs = [new.pop(e["run_dir"], e) for e in previous]
    runs += [e for e in entries if e["run_dir"] in new]
    base.mkdir(parents=True, exist_ok=True)
    return atomic_write(base / SWEEP_FILE, json.dumps({"runs": runs}, indent=1) + "\n")
