"""Inference at the edge of max_seq_len: transformers' generate() on the exported modeling code
refuses up front a call that cannot fit, and fills the context exactly when it can; the
training model (a second implementation) is the reference for what it generates."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from pretrain.model import Transformer


@pytest.fixture
def models(make_model_config):
    """(training model, HF model) with the same random weights, max_seq_len 16, fp32."""
    from pretrain.hf.configuration_memlayers import MemlayersConfig
    from pretrain.hf.modeling_memlayers import MemlayersForCausalLM

    cfg = make_model_config(max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    hf = MemlayersForCausalLM(MemlayersConfig(model=asdict(cfg), eos_token_id=None, pad_token_id=0)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return model, hf


def greedy(model, prompt: list[int], steps: int) -> list[int]:
    """Greedy continuation recomputing the whole sequence each step (the training model)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_generate_past_max_seq_len_is_refused_before_any_forward(models):
    """Prompt 10 + 20 new tokens on a 16-token model ran 7 forwards, then raised from forward()
    ("cached 16 + new 1") with the tokens so far lost; now refused before the first forward."""
    model, hf = models
    limit = hf.config.max_seq_len
    calls = []
    hook = hf.register_forward_pre_hook(lambda *a: calls.append(1))
    prompt = torch.randint(1, 64, (1, 10), generator=torch.Generator().manual_seed(1))
    try:
        with pytest.raises(ValueError) as err:
            hf.generate(prompt, max_new_tokens=20, do_sample=False)
        assert calls == []
        message = str(err.value)
        assert "the prompt is 10 tokens" in message and "20 new tokens" in message
        assert f"max_seq_len is {limit}" in message
        assert f"lower max_new_tokens to at most {limit + 1 - 10}" in message
        with pytest.raises(ValueError, match="20 new tokens were asked for \\(max_length 30\\)"):
            hf.generate(prompt, max_length=30, do_sample=False)  # the same through max_length
        long_prompt = torch.randint(1, 64, (1, limit + 4), generator=torch.Generator().manual_seed(2))
        with pytest.raises(ValueError, match=f"shorten the prompt to at most {limit + 1 - 3} tokens"):
            hf.generate(long_prompt, max_new_tokens=3, do_sample=False)
        assert calls == []
    finally:
        hook.remove()
    # the largest call that fits: prompt + new tokens = max_seq_len + 1 (the last is never fed back)
    n = limit + 1 - prompt.shape[1]
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False)
    assert out.shape[1] == limit + 1
    assert out[0, prompt.shape[1] :].tolist() == greedy(model, prompt[0].tolist(), n)


def test_a_left_padded_batch_counts_its_padded_width(models):
    model, hf = models
    limit = hf.config.max_seq_len
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16]]
    width = max(map(len, prompts))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :], mask[r, width - len(p) :] = torch.tensor(p), 1
    with pytest.raises(ValueError, match=f"the prompt is {width} tokens.*at most {limit + 1 - width}"):
        hf.generate(ids, attention_mask=mask, max_new_tokens=limit + 2 - width, do_sample=False)
    out = hf.generate(ids, attention_mask=mask, max_new_tokens=limit + 1 - width, do_sample=False)
    for r, p in enumerate(prompts):
        assert out[r, width:].tolist() == greedy(model, p, limit + 1 - width), r


def test_scoring_cuts_a_long_context_from_the_left_and_keeps_the_continuation(models):
    """continuation_logprobs raised from forward() ("shorten the prompt or lower max_new_tokens")
    on a pair longer than max_seq_len, after scoring the batches before it; lm-eval cuts such a
    context from the left. Reference: the training model in float64 on the last max_seq_len + 1
    tokens of each pair, its continuation's log-probabilities summed."""
    from pretrain.export.scoring import continuation_logprobs

    model, hf = models
    limit = hf.config.max_seq_len
    reference = model.double()
    g = torch.Generator().manual_seed(3)
    shapes = [(3, 2), (limit + 9, 3), (limit - 1, 2), (40, limit), (limit, 1), (5, 4)]
    pairs = [(torch.randint(1, 64, (c,), generator=g).tolist(), torch.randint(1, 64, (n,), generator=g).tolist())
             for c, n in shapes]  # fmt: skip
    got = continuation_logprobs(hf, pairs, batch_size=4)  # long and short pairs share batches
    for (context, continuation), (ll, is_greedy) in zip(pairs, got):
        seq = (context + continuation)[-(limit + 1) :]
        with torch.no_grad():
            logp = torch.log_softmax(reference(torch.tensor([seq[:-1]]))[0], -1)
        tail = logp[-len(continuation) :]
        want = tail.gather(-1, torch.tensor(continuation)[:, None]).sum().item()
        assert abs(ll - want) <= 1e-5, (len(context), len(continuation), ll, want)
        assert is_greedy == bool((tail.argmax(-1) == torch.tensor(continuation)).all())
    with pytest.raises(ValueError, match=f"pair 1: the continuation is {limit + 1} tokens, more than .*={limit}"):
        continuation_logprobs(hf, [pairs[0], ([1, 2], list(range(1, limit + 2)))])
    # an empty continuation: lm-eval's HF model asserts on one (a bare AssertionError)
    with pytest.raises(ValueError, match="pair 1 \\(context of 2 tokens\\): the continuation is empty"):
        continuation_logprobs(hf, [pairs[0], ([1, 2], [])])
    with pytest.raises(ValueError, match="pair 0: the context is empty: start it with the EOS id"):
        continuation_logprobs(hf, [([], [1, 2])])
    # text for ids ended in torch's "TypeError: new(): invalid data type 'str'" at the batch's tensor
    with pytest.raises(TypeError, match="pair 1: context and continuation are token-id lists, not text: encode"):
        continuation_logprobs(hf, [pairs[0], ("</s>Alice lives in", " Riverton")])


def test_the_exported_tokenizer_knows_the_model_context(inference_export):
    """tokenizer_config.json had no model_max_length: truncation=True cut nothing (transformers'
    'very large' default) and an input longer than the model went unwarned."""
    import json

    from transformers import AutoTokenizer

    limit = json.loads((inference_export / "config.json").read_text())["model"]["max_seq_len"]
    tok = AutoTokenizer.from_pretrained(inference_export, trust_remote_code=True)
    assert tok.model_max_length == limit
    text = " ".join(f"word{i}" for i in range(3 * limit))
    whole = tok(text)["input_ids"]
    assert len(whole) > limit
    assert tok(text, truncation=True)["input_ids"] == whole[:limit]


def test_a_static_cache_is_refused_by_name(models):
    """generate(cache_implementation="static") failed with "attention_mask has shape (1, 1, 6, 13),
    expected (1, 6)", a mask the caller never passed; the model supports the dynamic cache only."""
    from transformers import StaticCache

    _, hf = models
    prompt = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with pytest.raises(
        ValueError, match="in a DynamicCache \\(the default\\), not a StaticCache.*cache_implementation"
    ):
        hf.generate(prompt, max_new_tokens=3, do_sample=False, cache_implementation="static")
    with pytest.raises(ValueError, match="not a StaticCache"):
        hf(prompt, cache=StaticCache(config=hf.config, max_cache_len=16))
    assert hf.generate(prompt, max_new_tokens=3, do_sample=False, cache_implementation="dynamic").shape == (1, 9)
