"""The repetition penalty and n-gram blocking of `pretrain.export.generation` (and
memlayers-generate) behave as transformers' `generate()`: token for token against the HF export of
the same checkpoint, by hand on small tensors, and as properties of real generated sequences."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pretrain.data import Tokenizer
from pretrain.export import load
from pretrain.export.generation import generate, next_token, process_logits
from tests.export.export_helpers import OracleModel, fixed_tokens

# 6-token prompts from fixed_tokens(): (row, start). Plain greedy from (0, 0) ends in "229 229 229 ...",
# from (0, 12) and (1, 4) in a short loop; the others are what a random prompt gives.
PROMPTS = [(0, 0), (0, 12), (0, 16), (1, 4), (1, 12)]
STEPS = 20  # 6 + 20 <= max_seq_len 32
SETTINGS = [
    {"repetition_penalty": 1.3},
    {"repetition_penalty": 0.7},  # < 1 rewards repetition
    {"no_repeat_ngram_size": 1},
    {"no_repeat_ngram_size": 2},
    {"no_repeat_ngram_size": 3},
    {"repetition_penalty": 1.2, "no_repeat_ngram_size": 2},
]


def prompt_at(row: int, start: int, length: int = 6) -> list[int]:
    return fixed_tokens()[row, start : start + length].tolist()


def ngrams(seq: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def repeated_ngrams(seq: list[int], n: int) -> set[tuple[int, ...]]:
    return {gram for gram, count in Counter(ngrams(seq, n)).items() if count > 1}


def test_generate_with_penalties_equals_hf_generate(hf_model, inference_export):
    model = load(inference_export)
    eos = hf_model.config.eos_token_id
    changed = 0
    for row, start in PROMPTS:
        prompt = prompt_at(row, start)
        plain = generate(model, prompt, STEPS, eos_id=eos)
        for kwargs in SETTINGS:
            hf = hf_model.generate(torch.tensor([prompt]), max_new_tokens=STEPS, do_sample=False, **kwargs)
            want = hf[0, len(prompt) :].tolist()
            if eos in want:  # HF stops after EOS and keeps it; ours stops before it
                assert want.index(eos) == len(want) - 1
                want = want[:-1]
            for use_cache in (True, False):
                got = generate(model, prompt, STEPS, eos_id=eos, use_cache=use_cache, **kwargs)
                assert got == want, (row, start, kwargs, use_cache)
            changed += want != plain
    # the settings act: most of these continuations differ from plain greedy
    assert changed >= len(PROMPTS) * len(SETTINGS) // 2, changed


def test_repetition_penalty_by_hand():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.5, 0.0])
    before = logits.clone()
    seen = [0, 1, 1, 3, 5, 1]  # token 1 three times: penalised once
    got = process_logits(logits, seen, repetition_penalty=2.0)
    assert torch.equal(got, torch.tensor([1.0, -2.0, 0.5, -6.0, 1.5, 0.0]))
    assert torch.equal(logits, before)  # the input is left alone
    got = process_logits(logits, seen, repetition_penalty=0.5)
    assert torch.equal(got, torch.tensor([4.0, -0.5, 0.5, -1.5, 1.5, 0.0]))
    assert torch.equal(process_logits(logits, seen), logits)  # 1.0 = off
    # greedy: token 0 wins alone, token 4 once 0 is penalised; the penalty comes before argmax
    assert next_token(logits, 0.0, 1.0, None) == 0
    assert next_token(logits, 0.0, 1.0, None, seen, repetition_penalty=2.0) == 4
    assert next_token(logits, 0.0, 1.0, None, [2], repetition_penalty=2.0) == 0


def test_no_repeat_ngram_by_hand():
    logits = torch.tensor([0.1, 0.2, 3.0, 0.3, 0.4, 1.0])
    seq = [4, 1, 2, 0, 4, 1]  # "4 1" was followed by 2: with n = 3, 2 would complete "4 1 2" again
    inf = float("-inf")
    assert torch.equal(
        process_logits(logits, seq, no_repeat_ngram_size=3), torch.tensor([0.1, 0.2, inf, 0.3, 0.4, 1.0])
    )
    assert next_token(logits, 0.0, 1.0, None, seq) == 2
    assert next_token(logits, 0.0, 1.0, None, seq, no_repeat_ngram_size=3) == 5
    # n = 2: after "1", token 2 was seen; n = 1: every token present; n = 4: "0 4 1" never seen before
    assert torch.equal(
        process_logits(logits, seq, no_repeat_ngram_size=2), torch.tensor([0.1, 0.2, inf, 0.3, 0.4, 1.0])
    )
    assert torch.equal(
        process_logits(logits, seq, no_repeat_ngram_size=1), torch.tensor([inf, inf, inf, 0.3, inf, 1.0])
    )
    assert torch.equal(process_logits(logits, seq, no_repeat_ngram_size=4), logits)
    # two earlier continuations of the prefix are both blocked; a sequence shorter than n - 1 blocks nothing
    seq = [7, 1, 2, 7, 1, 3, 7, 1]  # "7 1" was followed by 2 and by 3
    got = process_logits(torch.zeros(8), seq, no_repeat_ngram_size=3)
    assert torch.isinf(got).nonzero().flatten().tolist() == [2, 3]
    assert torch.equal(process_logits(logits, [4], no_repeat_ngram_size=3), logits)
    # both together: the penalty, then the block (-inf stays -inf)
    got = process_logits(logits, [4, 1, 2, 0, 4, 1], repetition_penalty=2.0, no_repeat_ngram_size=3)
    assert torch.equal(got, torch.tensor([0.05, 0.1, inf, 0.3, 0.2, 1.0]))
    # sampling never draws a blocked token, however likely it is
    gen = torch.Generator().manual_seed(0)
    draws = {next_token(logits, 1.0, 1.0, gen, [4, 1, 2, 0, 4, 1], no_repeat_ngram_size=3) for _ in range(300)}
    assert 2 not in draws and len(draws) > 2


def test_logit_processing_equals_transformers_processors():
    """Random short sequences over a small vocabulary (many repeats) against transformers' own
    RepetitionPenaltyLogitsProcessor and NoRepeatNGramLogitsProcessor."""
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    gen = torch.Generator().manual_seed(7)
    for trial in range(200):
        vocab, length = 6 + trial % 5, 1 + trial % 13
        seq = torch.randint(0, vocab, (1, length), generator=gen)
        logits = torch.randn(1, vocab, generator=gen) * 3
        penalty = [1.3, 0.6, 2.5][trial % 3]
        n = 1 + trial % 4
        want = RepetitionPenaltyLogitsProcessor(penalty)(seq, logits.clone())
        assert torch.equal(process_logits(logits[0], seq[0].tolist(), repetition_penalty=penalty), want[0])
        want = NoRepeatNGramLogitsProcessor(n)(seq, logits.clone())
        assert torch.equal(process_logits(logits[0], seq[0].tolist(), no_repeat_ngram_size=n), want[0])


def test_penalties_on_real_sequences_cached_equals_uncached(inference_export):
    model = load(inference_export)
    prompt = prompt_at(0, 0)
    steps = model.cfg.max_seq_len + 1 - len(prompt)
    plain = generate(model, prompt, steps)
    assert Counter(plain).most_common(1)[0][1] >= 10  # degenerate: one token over and over
    for n in (1, 2, 3):
        assert repeated_ngrams(plain, n)
    for kwargs in [{"temperature": 0.0}, {"temperature": 1.0, "top_p": 0.95, "seed": 11}]:
        for n in (1, 2, 3):
            runs = [
                generate(model, prompt, steps, no_repeat_ngram_size=n, use_cache=c, **kwargs) for c in (True, False)
            ]
            assert runs[0] == runs[1], (kwargs, n)
            assert len(runs[0]) == steps
            assert not repeated_ngrams(prompt, n)  # so no n-gram of the whole sequence may repeat
            assert not repeated_ngrams(prompt + runs[0], n), (kwargs, n)
    runs = [generate(model, prompt, steps, repetition_penalty=1.3, use_cache=c) for c in (True, False)]
    assert runs[0] == runs[1] != plain
    assert Counter(runs[0]).most_common(1)[0][1] < Counter(plain).most_common(1)[0][1]
    sampled = [
        generate(model, prompt, steps, temperature=0.9, top_p=0.9, seed=5, repetition_penalty=1.3, use_cache=c)
        for c in (True, False)
    ]
    assert sampled[0] == sampled[1]


class NoForward(OracleModel):
    def forward(self, tokens, cache=None):
        raise AssertionError("the model ran before the arguments were checked")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"repetition_penalty": 0.0}, r"repetition_penalty=0.0 must be a finite number > 0"),
        ({"repetition_penalty": -1.2}, r"repetition_penalty=-1.2 must be a finite number > 0"),
        ({"repetition_penalty": float("nan")}, r"repetition_penalty=nan must be a finite number > 0"),
        ({"repetition_penalty": float("inf")}, r"repetition_penalty=inf must be a finite number > 0"),
        ({"repetition_penalty": "1.2"}, r"repetition_penalty='1.2' must be a number > 0"),
        ({"no_repeat_ngram_size": -1}, r"no_repeat_ngram_size=-1 must be an integer >= 0"),
        ({"no_repeat_ngram_size": 2.0}, r"no_repeat_ngram_size=2.0 must be an integer >= 0"),
        ({"no_repeat_ngram_size": True}, r"no_repeat_ngram_size=True must be an integer >= 0"),
    ],
)
def test_invalid_values_raise_before_any_work(kwargs, message):
    model = NoForward([], vocab=8)
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2], 3, **kwargs)
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2], 3, use_cache=False, **kwargs)
    with pytest.raises(ValueError, match=message):
        next_token(torch.zeros(8), 0.0, 1.0, None, [1], **kwargs)
    # the valid neighbours run (the oracle knows no sequence: ties, argmax 0)
    assert generate(OracleModel([], vocab=8), [1, 2], 3, repetition_penalty=1.0, no_repeat_ngram_size=0) == [0, 0, 0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.5}, r"temperature=-0.5 must be a finite number >= 0"),
        ({"temperature": 0.8, "top_p": 0.0}, r"top_p=0.0 must be a number in \(0, 1\]"),
        ({"temperature": 0.8, "top_p": 1.5}, r"top_p=1.5 must be a number in \(0, 1\]"),
    ],
)
def test_bad_sampling_values_raise_before_the_model_runs(kwargs, message):
    for use_cache in (True, False):
        with pytest.raises(ValueError, match=message):
            generate(NoForward([], vocab=8), [1, 2], 3, use_cache=use_cache, **kwargs)


def test_generate_tool_passes_the_flags_through(inference_export, capsys):
    from tools.generate import main

    tok = Tokenizer(inference_export / "tokenizer.model")
    model = load(inference_export)
    text = "Alice lives in"
    prompt = [tok.eos_id] + tok.encode(text)
    printed = {}
    for flags, kwargs in [
        ([], {}),
        (["--repetition-penalty", "1.3"], {"repetition_penalty": 1.3}),
        (["--no-repeat-ngram-size", "2", "--no-cache"], {"no_repeat_ngram_size": 2}),
    ]:
        assert main([str(inference_export), "--prompt", text, "--max-new-tokens", "12", *flags]) == 0
        printed[tuple(flags)] = capsys.readouterr().out.strip()
        want = generate(model, prompt, 12, eos_id=tok.eos_id, **kwargs)
        assert printed[tuple(flags)] == tok.decode(prompt + want)
    assert len(set(printed.values())) == 3  # "Alice lives in" degenerates; each flag changes the text


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--repetition-penalty", "0"], "argument --repetition-penalty: 0 must be a finite number > 0"),
        (["--repetition-penalty", "-1"], "argument --repetition-penalty: -1 must be a finite number > 0"),
        (["--repetition-penalty", "x"], "argument --repetition-penalty: 'x' is not a number"),
        (["--no-repeat-ngram-size", "-2"], "argument --no-repeat-ngram-size: -2 must be an integer >= 0"),
        (["--no-repeat-ngram-size", "1.5"], "argument --no-repeat-ngram-size: '1.5' is not an integer"),
        (["--probes", "3", "--no-repeat-ngram-size", "2"], "apply to --prompt generation, not --probes"),
        (["--probes", "3", "--temperature", "0.7"], "--temperature: sampling options apply to --prompt generation"),
        (["--probes", "3", "--top-p", "0.9"], "--top-p: sampling options apply to --prompt generation"),
    ],
)
def test_generate_tool_refuses_bad_values(tmp_path, capsys, flags, message):
    from tools.generate import main

    # the folder does not exist: the error comes from argument parsing, before anything is read
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing"), "--prompt", "The", *flags])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
