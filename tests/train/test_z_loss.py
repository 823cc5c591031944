"""optim.z_loss: the log(Z)^2 term against float64, its gradient against the closed form, and
in training: the logged loss stays the cross-entropy, the term is logged and pulled down."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError, load_config
from pretrain.model import language_model_loss, z_loss
from pretrain.train import train
from tests.train.helpers import tiny_config


def test_term_and_gradient_against_float64():
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 11, dtype=torch.float64) * 4).requires_grad_()
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :2] = -100  # ignored positions count in neither term
    keep = targets != -100
    log_z = logits.exp().sum(-1).log()  # the normaliser written out
    assert float(z_loss(logits.detach().float(), targets)) == pytest.approx(
        float(log_z[keep].pow(2).mean().detach()), rel=1e-6
    )
    weight = 0.3
    (grad,) = torch.autograd.grad(language_model_loss(logits, targets) + weight * z_loss(logits, targets), logits)
    # d/dlogits: (softmax - onehot) / n for CE, 2 log Z softmax / n for the z term, 0 where ignored
    n = int(keep.sum())
    softmax = logits.softmax(-1).detach()
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), 11).double()
    expected = (softmax - onehot + weight * 2 * log_z.detach()[..., None] * softmax) / n * keep[..., None]
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_training_with_z_loss(tmp_path, data_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def run(name: str, *overrides: str):
        result = train(tiny_config(tmp_path / name, data_cache, "train.max_steps=12", "optim.lr=1e-2", *overrides))
        board = EventAccumulator(str(tmp_path / name / "tensorboard")).Reload()
        z = [e.value for e in board.Scalars("train/z_loss")] if "train/z_loss" in board.Tags()["scalars"] else None
        return result, z

    plain, no_term = run("plain")
    weak, z_weak = run("weak", "optim.z_loss=1e-9")  # logged, too weak to matter
    pulled, z_pulled = run("pulled", "optim.z_loss=0.1")
    assert no_term is None  # nothing computed or logged at 0
    assert pulled.losses[0] == plain.losses[0]  # the logged loss is the cross-entropy; same first forward
    assert pulled.losses[1] != plain.losses[1]  # the update differs
    assert len(z_pulled) == 12 and z_pulled[0] == pytest.approx(z_weak[0]) and z_pulled[0] > 25  # ~ln(384)^2
    # the term pulls log Z towards 0: below the weak run from the second update on (Adam's first,
    # sign-like step may go either way), ever further (measured: 0.65 lower at step 2, 5.0 at 11)
    assert all(p < w for p, w in zip(z_pulled[2:], z_weak[2:]))
    assert z_weak[-1] - z_pulled[-1] > 2 * (z_weak[2] - z_pulled[2])
    with pytest.raises(ConfigError, match="optim.z_loss=-1.0 must be >= 0"):
        load_config("configs/tiny.yaml", ["optim.z_loss=-1"])
