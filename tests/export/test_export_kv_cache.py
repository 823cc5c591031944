"""KV-cached inference equals full recomputation: the exported HF model (transformers' Cache,
generate(), left-padded batches), the training model's optional KVCache, and batched scoring.
The reference everywhere is `pretrain.export.load`'s model recomputing each unpadded sequence."""

from __future__ import annotations

import pytest
import torch

from pretrain.export import load
from pretrain.model.kv_cache import KVCache
from tests.export.export_helpers import fixed_tokens

ATOL = 1e-5


def reference_greedy(model, prompt: list[int], steps: int):
    """Greedy tokens and per-step last-position logits, recomputing the whole sequence each step."""
    seq, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            last = model(torch.tensor([seq]))[0, -1]
            logits.append(last)
            seq.append(int(last.argmax()))
    return seq[len(prompt) :], torch.stack(logits)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def test_hf_generate_with_cache_equals_recomputation_batch_1(hf_model, inference_export):
    reference = load(inference_export)
    prompt = fixed_tokens()[:1, :6]
    fed = []
    hook = hf_model.register_forward_pre_hook(lambda m, a, kw: fed.append(kw["input_ids"].shape[1]), with_kwargs=True)
    try:
        runs = {
            use_cache: hf_model.generate(
                prompt,
                max_new_tokens=12,
                do_sample=False,
                use_cache=use_cache,
                output_logits=True,
                return_dict_in_generate=True,
            )
            for use_cache in (True, False)
        }
    finally:
        hook.remove()
    assert fed[:12] == [6] + [1] * 11  # the cached run feeds one token per step
    assert fed[12:] == list(range(6, 18))  # the uncached one the whole sequence
    want_tokens, want_logits = reference_greedy(reference, prompt[0].tolist(), 12)
    for run in runs.values():
        assert run.sequences[0, 6:].tolist() == want_tokens
        got = torch.stack(run.logits, dim=1)[0]
        assert max_err(got, want_logits) <= ATOL


def test_hf_generate_left_padded_batch_equals_each_prompt_alone(hf_model, inference_export):
    reference = load(inference_export)
    lengths, steps = [3, 7, 10, 12], 10
    prompts = [row[:n].tolist() for row, n in zip(fixed_tokens(batch=4), lengths)]
    width = max(lengths)
    ids = torch.full((4, width), hf_model.config.pad_token_id, dtype=torch.long)
    mask = torch.zeros(4, width, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :], mask[r, width - len(p) :] = torch.tensor(p), 1
    for use_cache in (True, False):
        out = hf_model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=steps,
            do_sample=False,
            use_cache=use_cache,
            output_logits=True,
            return_dict_in_generate=True,
        )
        logits = torch.stack(out.logits, dim=1)
        for r, p in enumerate(prompts):
            want_tokens, want_logits = reference_greedy(reference, p, steps)
            eos = hf_model.config.eos_token_id  # generate() ends a row at EOS and pads it from then on
            n = want_tokens.index(eos) + 1 if eos in want_tokens else steps
            assert out.sequences[r, width : width + n].tolist() == want_tokens[:n], (use_cache, r)
            assert max_err(logits[r, :n], want_logits[:n]) <= ATOL, (use_cache, r)


def test_hf_generate_keeps_the_leading_separator_without_an_attention_mask(hf_model, inference_export):
    """A prompt starts with the EOS separator (docs/export-and-eval.md: "</s>Alice"). With config.json's pad_token_id
    equal to it, generate() given no attention_mask and a stop token other than EOS (eos_token_id=None,
    or a full stop) inferred the mask from the padding id and hid that separator: other logits and tokens."""
    from pretrain.data.tokenizer import Tokenizer

    reference = load(inference_export)
    tokenizer = Tokenizer(inference_export / "tokenizer.model")
    assert hf_model.config.pad_token_id == tokenizer.pad_id != tokenizer.eos_id  # <pad>: never in the data
    prompt = [tokenizer.eos_id] + fixed_tokens()[0, :5].tolist()
    want_tokens, want_logits = reference_greedy(reference, prompt, 8)
    for stop in (None, tokenizer.encode("It ends.")[-1]):  # no stop token, or a full stop
        out = hf_model.generate(
            torch.tensor([prompt]),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=stop,
            output_logits=True,
            return_dict_in_generate=True,
        )
        got = torch.stack(out.logits, dim=1)[0]
        n = got.shape[0]  # a row that met the stop token ends there
        assert out.sequences[0, len(prompt) :].tolist() == want_tokens[:n], stop
        assert max_err(got, want_logits[:n]) <= ATOL, stop


def test_hf_logits_equal_load_with_and_without_cache(hf_model, inference_export):
    from transformers import DynamicCache

    reference = load(inference_export)
    tokens = fixed_tokens()
    with torch.no_grad():
        want = reference(tokens)
        assert max_err(hf_model(tokens, use_cache=False).logits, want) <= ATOL
        cache = DynamicCache(config=hf_model.config)
        # prefill 20, one token at a time, then a chunk of 8 after the cache (offset causal mask)
        pieces = [hf_model(tokens[:, :20], cache=cache).logits]
        pieces += [hf_model(tokens[:, i : i + 1], cache=cache).logits for i in range(20, 24)]
        pieces.append(hf_model(tokens[:, 24:], cache=cache).logits)
        assert cache.get_seq_length() == tokens.shape[1]
        assert max_err(torch.cat(pieces, dim=1), want) <= ATOL
        with pytest.raises(
            ValueError, match=r"sequence length 33 \(cached 32 \+ new 1\) exceeds the model's max_seq_len=32"
        ):
            hf_model(tokens[:, :1], cache=cache)


def test_training_model_cache_equals_full_forward(inference_export):
    model = load(inference_export)
    tokens = fixed_tokens()
    with torch.no_grad():
        want = model(tokens)
        cache = KVCache(len(model.layers))
        pieces = [model(tokens[:, :20], cache=cache)]
        pieces += [model(tokens[:, i : i + 1], cache=cache) for i in range(20, 24)]
        pieces.append(model(tokens[:, 24:], cache=cache))
    assert cache.length == tokens.shape[1]
    assert max_err(torch.cat(pieces, dim=1), want) <= ATOL
    with pytest.raises(ValueError, match="max_seq_len=32"):
        model(tokens[:, :1], cache=cache)


def test_pretrain_generate_cached_equals_uncached(inference_export):
    from pretrain.export.generation import generate

    model = load(inference_export)
    prompt = fixed_tokens()[1, :5].tolist()
    want, _ = reference_greedy(model, prompt, 20)
    assert generate(model, prompt, 20, use_cache=True) == want
    assert generate(model, prompt, 20, use_cache=False) == want
    sampled = [generate(model, prompt, 20, temperature=0.9, top_p=0.9, seed=5, use_cache=c) for c in (True, False)]
    assert sampled[0] == sampled[1]
    with pytest.raises(
        ValueError, match="max_seq_len is 32: shorten the prompt or lower --max-new-tokens to at most 28"
    ):
        generate(model, prompt, 29)


def test_batched_loglikelihoods_equal_unbatched(hf_model, inference_export):
    from pretrain.export.scoring import continuation_logprobs

    rows = fixed_tokens(batch=2, length=32).flatten().tolist()
    pairs = [(rows[i : i + 2 + i % 9], rows[40 + i : 40 + i + 1 + i % 4]) for i in range(10)]
    batched = continuation_logprobs(hf_model, pairs, batch_size=4)
    single = [continuation_logprobs(hf_model, [pair], batch_size=1)[0] for pair in pairs]
    reference = load(inference_export)
    for (ll, greedy), (ll1, greedy1), (context, continuation) in zip(batched, single, pairs):
        assert abs(ll - ll1) <= ATOL and greedy == greedy1
        with torch.no_grad():  # independent: the training model on the unpadded pair
            logp = torch.log_softmax(reference(torch.tensor([context + continuation]))[0].double(), -1)
        tail = logp[len(context) - 1 : -1]
        assert abs(ll - tail.gather(-1, torch.tensor(continuation)[:, None]).sum().item()) <= ATOL
        assert greedy == bool((tail.argmax(-1) == torch.tensor(continuation)).all())
    # a pair the model predicts greedily is reported so
    context = pairs[0][0]
    greedy_next, _ = reference_greedy(reference, context, 3)
    assert continuation_logprobs(hf_model, [(context, greedy_next)])[0][1]
