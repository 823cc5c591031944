"""pretrain/run_plan.py: the plan's epochs against a mixture actually drawn, its parameters
against a built model, and the note on sources read many times over."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from data_helpers import SEQ_LEN
from pretrain.config import load_config
from pretrain.data.mixture import MixtureLoader
from pretrain.data.sources import resolve_sources
from pretrain.model import Transformer
from pretrain.run_plan import MANY_EPOCHS, describe_plan, training_plan
from tests.data.test_train_own_data import OWN


def two_sources(a, b, wa, wb):
    return f"data.sources=[{{dir: {a}, weight: {wa}, name: a}}, {{dir: {b}, weight: {wb}, name: b}}]"


def test_epochs_are_what_the_mixture_draws(dataset, second_dataset):
    cfg = load_config(None, [*OWN, two_sources(dataset, second_dataset, 1.0, 3.0), "train.max_steps=300"])
    sources = resolve_sources(cfg.data, cfg.data.seq_len)
    plan = training_plan(cfg, sources)
    assert plan.tokens == 300 * cfg.train.global_batch * SEQ_LEN
    mix = MixtureLoader(sources, batch_size=cfg.train.global_batch, seed=3)
    it = iter(mix)
    for _ in range(300):
        next(it)
    n = 300 * cfg.train.global_batch
    for s, drawn in zip(sources, mix.sequences):
        p = s.weight / 4.0
        expected = plan.epochs[s.name] * s.train_sequences
        assert expected == pytest.approx(n * p)
        assert abs(drawn - expected) <= 4 * math.sqrt(n * p * (1 - p)), (s.name, drawn, expected)


def test_parameters_are_the_built_models(dataset):
    cfg = load_config(None, [*OWN, f"data.dir={dataset}"])
    plan = training_plan(cfg, resolve_sources(cfg.data, cfg.data.seq_len))
    model = Transformer(cfg.model)
    values = sum(p.numel() for name, p in model.named_parameters() if name.startswith("values."))
    assert plan.total_parameters == sum(p.numel() for p in model.parameters())  # tied weights once
    assert plan.active_parameters == plan.total_parameters - values
    assert plan.training_flops == plan.flops_per_token * plan.tokens


def test_a_source_read_many_times_is_noted():
    plan = SimpleNamespace(
        steps=1000, sequences_per_step=16, seq_len=128, active_parameters=898_000, total_parameters=3_000_000,
        flops_per_token=1.0e7, epochs={"web": 0.5, "docs": 12.5}, tokens=2_048_000, training_flops=2.048e13,
    )  # fmt: skip
    lines = describe_plan(plan)
    assert lines[0] == (
        "plan: 1000 steps x 16 sequences x 128 tokens = 2.05M tokens (web 0.50 epochs; docs 12.50 epochs); "
        "898K active of 3M parameters, 2.28 tokens per active parameter; 2.05e+13 training FLOPs"
    )
    assert len(lines) == 2 and lines[1].startswith(
        f"plan: docs is read 12.5 times over; beyond ~{MANY_EPOCHS:g} epochs"
    )
    assert describe_plan(plan, note_repeats=False) == lines[:1]
    plan.epochs = {"web": MANY_EPOCHS}
    assert len(describe_plan(plan)) == 1  # at the bound: no note


def test_embedded_data_not_yet_built_has_no_epochs():
    cfg = load_config(None, ["model.dim=32", "model.n_layers=1", "model.n_heads=2"])
    plan = training_plan(cfg, [])
    assert plan.epochs == {} and "epochs" not in describe_plan(plan)[0]
    with torch.device("meta"):
        assert plan.total_parameters == sum(p.numel() for p in Transformer(cfg.model).parameters())
