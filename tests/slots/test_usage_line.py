"""The trainer's slot-usage console line against a brute-force count over the raw top-k picks."""

from __future__ import annotations

import math
import re

import pytest
import torch

import pretrain.build as build_module
from pretrain.slots.summary import usage_lines
from pretrain.train import train
from tests.train.helpers import tiny_config

LINE = re.compile(
    r"slots (\S+) steps (\d+)-(\d+): ([\d.]+)% of slots read, top 1% of slots ([\d.]+)% of accesses, "
    r"KL from uniform ([\d.]+) nats; ([\d.]+)% ever read"
)


def brute_force(picks: list[torch.Tensor], num_slots: int) -> dict[str, float]:
    """Share of slots read, top-1% share and KL(p || uniform) of raw picks, by a Python count in float64."""
    counts = [0] * num_slots
    for t in picks:
        for slot in t.reshape(-1).tolist():
            counts[slot] += 1
    total = sum(counts)
    top = sorted(counts, reverse=True)[: math.ceil(num_slots / 100)]
    return {
        "read": sum(c > 0 for c in counts) / num_slots,
        "top1pct": sum(top) / total,
        "kl": sum(c / total * math.log(c / total * num_slots) for c in counts if c),
    }


def test_console_line_against_a_brute_force_count_of_the_top_k_picks(tmp_path, data_cache, monkeypatch, capsys):
    """Two memory layers sharing one value table (counters layers.0, layers.1, values.0), 4096 slots,
    6 steps of 2 micro-batches, a slot log every 2 steps: each log prints one line per counter whose
    numbers are those of the raw picks of the interval's steps (and of all steps so far), hooked off
    the layers' training forwards, and those TensorBoard shows."""
    reads: dict[str, list[torch.Tensor]] = {"layers.0": [], "layers.1": []}
    build = build_module.build_model

    def record(*args, **kwargs):
        model, *rest = build(*args, **kwargs)
        for name, block in zip(reads, model.memory_layers()):
            block.register_lookup_hook(
                lambda layer, idx, w, n=name: reads[n].append(idx.clone()) if layer.training else None
            )
        return (model, *rest)

    monkeypatch.setattr(build_module, "build_model", record)
    cfg = tiny_config(
        tmp_path / "run", data_cache, "model.memory.layers=[0,1]", "model.memory.n_keys=64", "train.max_steps=6"
    )
    assert cfg.slots.log_every == 2 and cfg.model.memory.shared_values and cfg.model.memory.num_slots == 4096
    train(cfg)
    lines = [
        LINE.fullmatch(line.split("] ", 1)[1]) for line in capsys.readouterr().out.splitlines() if "] slots " in line
    ]
    assert all(lines) and len(lines) == 3 * 3, lines
    per_step = 2  # micro-batches (forwards) per step
    assert len(reads["layers.0"]) == len(reads["layers.1"]) == 6 * per_step
    reads["values.0"] = [torch.cat(pair, dim=1) for pair in zip(reads["layers.0"], reads["layers.1"])]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    shown = {(tag, e.step): e.value for tag in board.Tags()["scalars"] for e in board.Scalars(tag)}
    seen = []
    for match in lines:
        name, first, last = match.group(1), int(match.group(2)), int(match.group(3))
        seen.append((name, first, last))
        interval = brute_force(reads[name][(first - 1) * per_step : last * per_step], 4096)
        ever = brute_force(reads[name][: last * per_step], 4096)["read"]
        assert match.group(4) == f"{100 * interval['read']:.1f}"
        assert match.group(5) == f"{100 * interval['top1pct']:.1f}"
        assert match.group(6) == f"{interval['kl']:.3f}"
        assert match.group(7) == f"{100 * ever:.1f}"
        assert 0.01 < interval["read"] < 0.99 and (first == 1 or ever > interval["read"])  # not a trivial case
        for key, want in (("used_fraction", interval["read"]), ("top1pct_share", interval["top1pct"])):
            assert shown[(f"slots/{name}/interval/{key}", last)] == pytest.approx(want, rel=1e-6)
        assert shown[(f"slots/{name}/interval/kl_uniform", last)] == pytest.approx(interval["kl"], rel=1e-5)
        assert shown[(f"slots/{name}/used_fraction", last)] == pytest.approx(ever, rel=1e-6)
    assert seen == [(n, a, b) for a, b in ((1, 2), (3, 4), (5, 6)) for n in ("layers.0", "layers.1", "values.0")]


def test_an_interval_without_accesses_says_so():
    scalars = {
        "slots/m/used_fraction": 0.25,
        **{f"slots/m/interval/{k}": 0.0 for k in ("used_fraction", "top1pct_share", "kl_uniform")},
    }
    assert usage_lines(scalars, ["m"], 3, 4) == ["slots m steps 3-4: no slot accesses (skipped steps); 25.0% ever read"]
    assert usage_lines(scalars, ["m"], 4, 4) == ["slots m step 4: no slot accesses (skipped steps); 25.0% ever read"]
