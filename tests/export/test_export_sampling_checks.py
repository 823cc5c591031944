"""generate() refuses sampling settings outside their domain before any forward pass: a NaN or
infinite temperature reached torch.multinomial ("probability tensor contains inf/nan") and a
negative max_new_tokens returned nothing, silently."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.export.generation import check_length, check_sampling, generate
from tests.export.export_helpers import OracleModel

SEQUENCE = [3, 10, 11, 12, 13, 14]


@pytest.mark.parametrize("temperature", [math.nan, math.inf, -0.5, "0.7", True])
def test_temperature_outside_its_domain_is_refused(temperature):
    model = OracleModel([SEQUENCE], vocab=16)
    with pytest.raises(ValueError, match=r"temperature=.* must be a finite number >= 0 \(0 = greedy\)"):
        generate(model, SEQUENCE[:2], 3, temperature=temperature)


@pytest.mark.parametrize("top_p", [math.nan, 0.0, 1.5, "1"])
def test_top_p_outside_its_domain_is_refused(top_p):
    with pytest.raises(ValueError, match=r"top_p=.* must be a number in \(0, 1\]"):
        check_sampling(0.7, top_p)


@pytest.mark.parametrize("max_new_tokens", [-1, 2.5, True])
def test_max_new_tokens_must_be_an_integer_at_least_zero(max_new_tokens):
    model = OracleModel([SEQUENCE], vocab=16)
    with pytest.raises(ValueError, match=r"max_new_tokens=.* must be an integer >= 0 \(--max-new-tokens\)"):
        generate(model, SEQUENCE[:2], max_new_tokens)


def test_the_domain_edges_still_generate():
    model = OracleModel([SEQUENCE], vocab=16)
    assert generate(model, SEQUENCE[:2], 0) == []
    assert generate(model, SEQUENCE[:2], 4) == SEQUENCE[2:]  # temperature 0: greedy
    # a tiny positive temperature samples the oracle's (by far) most likely token
    assert generate(model, SEQUENCE[:2], 4, temperature=1e-3, top_p=1.0) == SEQUENCE[2:]
    check_length(2, 0, 8)
    check_sampling(torch.tensor(0.5).item(), 1.0)


@pytest.mark.parametrize("temperature", [5e-308, 1e-310, 5e-324])
def test_a_tiny_positive_temperature_samples_the_most_likely_token(temperature):
    """logit / temperature overflowed to inf at a tiny temperature (10 / 5e-308, or any denormal)
    and torch.multinomial refused the NaN probabilities; the limit of softmax(logits / T) as T -> 0
    is the greedy choice, which is what such a temperature now samples, under every seed."""
    model = OracleModel([SEQUENCE], vocab=16)
    for seed in range(3):
        assert generate(model, SEQUENCE[:2], 4, temperature=temperature, seed=seed) == SEQUENCE[2:]


def test_a_prompt_longer_than_the_context_names_the_prompt_length_that_fits():
    """A prompt longer than max_seq_len was told to "lower --max-new-tokens to at most 0", which
    cannot fit it: only a shorter prompt can. The longest prompt named must be accepted."""
    for prompt, new, longest in [(40, 4, 29), (40, 0, 32), (33, 1, 32)]:
        with pytest.raises(ValueError) as err:
            check_length(prompt, new, 32)
        message = str(err.value)
        assert f"the prompt is {prompt} tokens, longer than the model's max_seq_len of 32" in message
        assert (
            f"shorten the prompt to at most {longest} tokens" in message and "max-new-tokens to at most" not in message
        )
        check_length(longest, new, 32)  # the length named fits
        with pytest.raises(ValueError):
            check_length(longest + 1, new, 32)  # and is the longest that does
    with pytest.raises(ValueError, match="make prompt \\+ --max-new-tokens at most 33"):
        check_length(40, 40, 32)
