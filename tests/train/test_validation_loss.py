"""Validation loss is the mean over scored targets: a padded row (a split's last) weighs what
its real targets weigh, and a batch with nothing to score adds nothing."""

from __future__ import annotations

import torch

from pretrain.data.loader import IGNORE_INDEX, Batch
from pretrain.evaluate import validation_loss
from pretrain.model import ModelConfig, Transformer


def test_validation_loss_is_the_mean_over_scored_targets():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, max_seq_len=16)).eval()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 64, (3, 2, 16), generator=g)
    targets = torch.randint(0, 64, (3, 2, 16), generator=g)
    targets[1, 1, 4:] = IGNORE_INDEX  # a padded last row
    targets[2] = IGNORE_INDEX  # nothing to score
    batches = [Batch(tokens[i], targets[i], torch.zeros(2, 16, dtype=torch.long)) for i in range(3)]
    nll, scored = 0.0, 0
    with torch.no_grad():  # float64, token by token
        for b in batches:
            logp = model(b.tokens).double().log_softmax(-1)
            for row, t in zip(logp.flatten(0, 1), b.targets.flatten()):
                if t != IGNORE_INDEX:
                    nll, scored = nll - row[t].item(), scored + 1
    got = validation_loss(model, batches, torch.device("cpu"))
    assert scored == 2 * 16 + 16 + 4
    assert abs(got["val_loss"] - nll / scored) < 1e-6 * nll / scored
    assert validation_loss(model, batches[2:], torch.device("cpu")) == {}  # nothing scored: no number
