"""The learning-rate schedule (pretrain/lr_schedule.py): its shapes against formulas written
from the definition, warmup-stable-decay extended on resume, a changed schedule refused."""

from __future__ import annotations

import math

import pytest

from pretrain.checkpoint import latest_checkpoint
from pretrain.config import ConfigError, load_config
from pretrain.lr_schedule import check_resumed_schedule, decay_start, first_difference, learning_rates, lr_multiplier
from pretrain.train import train
from tests.train.helpers import final_parameters, tiny_config


def schedule(*overrides: str):
    return load_config("configs/tiny.yaml", ["optim.warmup_steps=10", "optim.min_lr_ratio=0.1", *overrides])


def multipliers(cfg) -> list[float]:
    return [lr_multiplier(step, cfg.optim, cfg.train.max_steps) for step in range(cfg.train.max_steps)]


def test_default_is_the_classic_cosine_bit_for_bit():
    """decay_fraction=1 decays from the end of warm-up: the formula every earlier run used."""
    cfg = schedule("train.max_steps=200")
    span = 200 - 10
    classic = [
        (s + 1) / 10 if s < 10 else 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (s - 10) / span)))
        for s in range(200)
    ]
    assert multipliers(cfg) == classic


@pytest.mark.parametrize(
    "shape,at_quarter,at_half",
    [
        ("linear", 0.75, 0.5),
        ("cosine", 0.5 * (1 + math.cos(math.pi / 4)), 0.5),
        ("sqrt", 0.5, 1 - math.sqrt(0.5)),  # 1 - sqrt(p): half the way down after a quarter
    ],
)
def test_warmup_stable_decay_shapes(shape, at_quarter, at_half):
    cfg = schedule("train.max_steps=1000", "optim.decay_fraction=0.2", f"optim.decay_shape={shape}")
    m = multipliers(cfg)
    assert decay_start(cfg.optim, 1000) == 800
    assert m[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert m[10:801] == [1.0] * 791  # stable, and the decay's first step is still at the peak
    rescale = lambda f: 0.1 + 0.9 * f  # noqa: E731 - from [1, 0] to [1, min_lr_ratio]
    assert m[850] == pytest.approx(rescale(at_quarter), rel=1e-12)
    assert m[900] == pytest.approx(rescale(at_half), rel=1e-12)
    assert m[999] == pytest.approx(
        rescale({"linear": 1 / 200, "cosine": 0.5 * (1 + math.cos(math.pi * 0.995))}.get(shape, 1 - math.sqrt(0.995))),
        rel=1e-12,
    )
    assert all(a >= b for a, b in zip(m[10:], m[11:]))  # never rises after warm-up


def test_constant_and_values_follow_or_not():
    cfg = schedule("train.max_steps=100", "optim.decay_shape=none", "optim.lr=2e-3", "optim.value_lr=1e-3")
    assert multipliers(cfg)[10:] == [1.0] * 90
    cfg = schedule("train.max_steps=100", "optim.lr=2e-3", "optim.value_lr=1e-3")
    dense, values = zip(*(learning_rates(s, cfg) for s in range(100)))
    assert [v * 2 for v in values] == pytest.approx(dense, rel=1e-15)  # follow: the same shape
    cfg.optim.value_lr_schedule = "cosine"  # the older name of follow
    assert [learning_rates(s, cfg)[1] * 2 for s in range(100)] == pytest.approx(dense, rel=1e-15)
    cfg.optim.value_lr_schedule = "constant"
    assert {learning_rates(s, cfg)[1] for s in range(100)} == {1e-3}


def test_decay_is_never_longer_than_the_steps_after_warmup():
    cfg = schedule("train.max_steps=20", "optim.decay_fraction=0.9")  # 18 decay steps asked, 10 exist
    assert decay_start(cfg.optim, 20) == 10
    assert multipliers(cfg)[9] == 1.0 and multipliers(cfg)[11] < 1.0


def test_extending_a_wsd_run_before_its_decay_keeps_every_step_taken():
    old = schedule("train.max_steps=1000", "optim.decay_fraction=0.2")
    longer = schedule("train.max_steps=3000", "optim.decay_fraction=0.1")
    assert first_difference(old, longer, 800) is None
    note = check_resumed_schedule(old, longer, 800, "step_00000800")
    assert "train.max_steps 1000 -> 3000" in note and "its decay begins at step 2701" in note
    assert first_difference(old, longer, 802) == 801  # step 800 (0-based) is still at the peak in both
    with pytest.raises(ConfigError) as err:
        check_resumed_schedule(old, longer, 900, "step_00000900")
    message = str(err.value)
    assert "resuming at step 900" in message and "step 802 took lr" in message
    assert "optim.allow_schedule_change=true" in message and "until its decay begins (step 801 here)" in message
    assert check_resumed_schedule(old, old, 900, "step_00000900") is None


def test_extending_a_cosine_run_is_refused_unless_deliberate():
    old, longer = schedule("train.max_steps=1000"), schedule("train.max_steps=2000")
    with pytest.raises(ConfigError, match=r"step 12 took lr .*optim.decay_fraction<1 \(warmup-stable-decay\)"):
        check_resumed_schedule(old, longer, 500, "step_00000500")
    lower = schedule("train.max_steps=1000", "optim.lr=1e-3", "optim.allow_schedule_change=true")
    note = check_resumed_schedule(old, lower, 500, "step_00000500")
    assert "on purpose" in note and "optim.lr 0.003 -> 0.001" in note and "step 1 took lr" in note


def test_messages_number_steps_as_the_training_log_does():
    """The log, the checkpoints and "resuming at step N" count steps from 1: the step named as
    having taken another rate is one of the N steps taken, numbered as the log numbered it (the
    log's step 1 ran at optim.lr / warmup_steps), and a run extends from every checkpoint up to
    the decay's first step, whose rate is still the peak. Until 2026-12-07 the messages counted
    from 0 ("resuming at step 1 ...: step 0 took lr 0.00015")."""
    old = schedule("train.max_steps=100", "optim.warmup_steps=20", "optim.lr=3e-3")
    lower = schedule("train.max_steps=100", "optim.warmup_steps=20", "optim.lr=1e-3")
    with pytest.raises(ConfigError) as err:
        check_resumed_schedule(old, lower, 1, "step_00000001")
    assert "resuming at step 1 " in str(err.value) and f"step 1 took lr {3e-3 / 20:.8g}" in str(err.value)

    wsd = schedule("train.max_steps=1000", "optim.decay_fraction=0.2")  # steps 801-1000 decay, 801 at the peak
    longer = schedule("train.max_steps=3000", "optim.decay_fraction=0.1")
    assert learning_rates(800, wsd)[0] == 3e-3 and learning_rates(801, wsd)[0] < 3e-3  # 0-based: logged 801, 802
    assert "it agrees with the 801 steps taken" in check_resumed_schedule(wsd, longer, 801, "step_00000801")
    with pytest.raises(ConfigError) as err:
        check_resumed_schedule(wsd, longer, 802, "step_00000802")
    assert "step 802 took lr" in str(err.value) and "until its decay begins (step 801 here)" in str(err.value)


def test_a_changed_value_rate_is_named_with_its_own_rates():
    """Only the value pool's rate changed: the refusal quotes the two value rates of the first step
    that differs (the dense rates are equal), and no decay hint (no decay moved)."""
    old, new = schedule("train.max_steps=1000"), schedule("train.max_steps=1000", "optim.value_lr=5e-4")
    with pytest.raises(ConfigError) as err:
        check_resumed_schedule(old, new, 50, "step_00000050")
    message = str(err.value)
    (old_dense, old_value), (new_dense, new_value) = learning_rates(0, old), learning_rates(0, new)
    assert old_dense == new_dense and new_value == old_value / 2
    assert f"step 1 took value lr {old_value:.8g} under the config of step_00000050, {new_value:.8g}" in message
    assert "optim.value_lr 0.001 -> 0.0005" in message and "decay_fraction" not in message


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.decay_fraction=0", "optim.decay_fraction=0.0 must be in (0, 1]"),
        ("optim.decay_fraction=1.5", "optim.decay_fraction=1.5 must be in (0, 1]"),
        ("optim.min_lr_ratio=2", "optim.min_lr_ratio=2.0 must be in [0, 1]"),
        ("optim.warmup_steps=-1", "optim.warmup_steps=-1 must be >= 0"),
        ("optim.lr=-1", "optim.lr=-1.0 and optim.value_lr=0.001 must be >= 0"),
        ("optim.decay_shape=exp", "optim.decay_shape='exp' must be cosine, linear, sqrt or none"),
    ],
)
def test_bad_schedule_settings_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", [override])
    assert message in str(err.value)


def test_a_resumed_run_extended_before_its_decay_equals_the_longer_run(tmp_path, data_cache, capsys):
    """Trained 4 of 8 steps (decay from step 6), then extended to 12 (decay from step 9): every
    loss and weight equal a straight 12-step run. Extending after the decay began is refused
    before anything is built, and the checkpoint stays the latest."""
    wsd = ("optim.decay_fraction=0.25", "optim.decay_shape=linear")
    straight = train(tiny_config(tmp_path / "a", data_cache, *wsd, "train.max_steps=12"))
    first = train(tiny_config(tmp_path / "b", data_cache, *wsd, "train.max_steps=8", "train.stop_after=4"))
    second = train(tiny_config(tmp_path / "b", data_cache, *wsd, "train.max_steps=12"))
    assert first.losses + second.losses == straight.losses  # bitwise
    a, b = final_parameters(tmp_path / "a"), final_parameters(tmp_path / "b")
    assert all(bool((a[key] == b[key]).all()) for key in a), "weights differ"
    assert "schedule changed (train.max_steps 8 -> 12); it agrees with the 4 steps taken" in capsys.readouterr().out

    half = ("optim.decay_fraction=0.5", "optim.decay_shape=linear")  # 8 steps: the decay begins at step 5 (0-based 4)
    train(tiny_config(tmp_path / "c", data_cache, *half, "train.max_steps=8", "train.stop_after=6"))
    with pytest.raises(ConfigError, match="resuming at step 6 with another learning-rate schedule"):
        train(tiny_config(tmp_path / "c", data_cache, *half, "train.max_steps=12"))
    assert latest_checkpoint(tmp_path / "c" / "checkpoints").name == "step_00000006"
    resumed = train(tiny_config(tmp_path / "c", data_cache, *half, "train.max_steps=8"))
    assert resumed.step == 8
