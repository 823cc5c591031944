"""The explicit slot hand-over: hooks fire once per real forward, the recorder refuses a
double count, evaluation forwards are not training accesses."""

from __future__ import annotations

import pytest
import torch

from pretrain.model.lookups import LookupRecorder
from pretrain.model.recompute import LookupTape
from pretrain.model.transformer import Transformer


def _model(make_model_config):
    torch.manual_seed(0)
    return Transformer(make_model_config(memory=dict(kernel="torch")))


def test_hook_receives_the_layers_own_slots_and_can_be_removed(make_model_config):
    model = _model(make_model_config)
    layer = model.memory_layers()[0]
    seen = []
    handle = layer.register_lookup_hook(lambda lay, idx, w: seen.append((lay, idx, w)))
    tokens = torch.randint(0, 64, (2, 5))
    model(tokens)
    assert len(seen) == 1 and seen[0][0] is layer
    _, idx, w = seen[0]
    assert idx.shape == w.shape == (10, layer.heads, layer.k) and not w.requires_grad
    # the same slots a direct search finds for this layer's input
    assert torch.equal(idx, layer.last_indices)
    handle.remove()
    model(tokens)
    assert len(seen) == 1


def test_recorder_counts_once_and_refuses_a_double_count(make_model_config):
    model = _model(make_model_config)
    recorder = LookupRecorder(model.memory_layers())
    tokens = torch.randint(0, 64, (2, 5))
    model(tokens)
    first = recorder.take()
    assert len(first) == 1 and first[0].shape[0] == 10
    model(tokens)
    model(tokens)  # two forwards without a take: a double count
    with pytest.raises(RuntimeError, match=r"handed over \[2\] lookups"):
        recorder.take()
    model.eval()
    model(tokens)  # evaluation reads slots but is not a training access
    model.train()
    with pytest.raises(RuntimeError, match=r"\[0\]"):
        recorder.take()


def test_no_hand_over_while_a_checkpoint_recomputes(make_model_config):
    model = _model(make_model_config)
    recorder = LookupRecorder(model.memory_layers())
    tokens = torch.randint(0, 64, (2, 5))
    tape = LookupTape()
    with tape.replaying_context():
        model(tokens)
    with pytest.raises(RuntimeError, match=r"\[0\]"):
        recorder.take()
    with tape.recording():
        model(tokens)
    assert len(recorder.take()) == 1
