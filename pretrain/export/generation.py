"""Sampling from a loaded model (greedy, temperature, nucleus/top-p) and the fact-probe quiz.

Two remedies for degenerate (looping) continuations act on each step's logits before the
temperature, nucleus and argmax, with the semantics of transformers' `generate()`: a
`repetition_penalty` (CTRL) divides the logit of every token id already in the sequence
(prompt + generated) by the penalty when positive and multiplies it when negative, once per id;
`no_repeat_ngram_size` = n sets to -inf the logit of every token that would complete an n-gram
already present in the sequence, prompt included.

Generation keeps a key/value cache (`pretrain.model.kv_cache`): the prompt runs once, then
each step feeds only the new token, so every token's attention keys and memory lookup are
computed once. `use_cache=False` (or a model whose forward takes no cache) recomputes the
whole sequence each step: the reference the cached path is tested against. Prompt plus new
tokens must fit in the model's max_seq_len.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence

import torch

from pretrain.evaluate import answer_tokens
from pretrain.model.kv_cache import KVCache


def check_penalties(repetition_penalty: float, no_repeat_ngram_size: int) -> None:
    """Raise on a repetition penalty outside (0, inf) or an n-gram size that is not an int >= 0."""
    if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, numbers.Real):
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be a number > 0 (1.0 = off)")
    if not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
        raise ValueError(f"repetition_penalty={repetition_penalty} must be a finite number > 0 (1.0 = off)")
    if (
        isinstance(no_repeat_ngram_size, bool)
        or not isinstance(no_repeat_ngram_size, numbers.Integral)
        or no_repeat_ngram_size < 0
    ):
        raise ValueError(f"no_repeat_ngram_size={no_repeat_ngram_size!r} must be an integer >= 0 (0 = off)")


def check_sampling(temperature: float, top_p: float) -> None:
    """Raise on a temperature that is not a finite number >= 0 (0 = greedy; NaN or inf would
    turn every probability into NaN or a uniform draw) or a nucleus mass outside (0, 1]."""
    if not (_is_number(temperature) and temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)")
    if not (_is_number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be a number in (0, 1] (1 = no nucleus cut)")


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def banned_ngram_tokens(tokens: Sequence[int], n: int) -> set[int]:
    """Token ids that would complete an n-gram already in `tokens`: those that followed an earlier
    occurrence of the last n - 1 tokens (for n = 1, every token present)."""
    if n <= 0 or len(tokens) + 1 < n:
        return set()
    tokens = list(tokens)
    prefix = tokens[len(tokens) - n + 1 :] if n > 1 else []
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == prefix}


def process_logits(
    logits: torch.Tensor, tokens: Sequence[int], repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0
) -> torch.Tensor:
    """Final-position logits (vocab,) with the repetition penalty and the n-gram block applied for
    the sequence so far `tokens` (prompt + generated); a new tensor, the input is left unchanged."""
    check_penalties(repetition_penalty, no_repeat_ngram_size)
    logits = logits.clone()
    if repetition_penalty != 1.0 and len(tokens):
        seen = torch.tensor(sorted(set(tokens)), dtype=torch.long, device=logits.device)
        picked = logits[seen]  # each id once, however often it occurs
        logits[seen] = torch.where(picked < 0, picked * repetition_penalty, picked / repetition_penalty)
    banned = banned_ngram_tokens(tokens, no_repeat_ngram_size)
    if banned:
        logits[torch.tensor(sorted(banned), dtype=torch.long, device=logits.device)] = float("-inf")
    return logits


def next_token(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
    tokens: Sequence[int] = (),
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> int:
    """One token id from final-position logits (vocab,): argmax at temperature 0, else nucleus
    sampling; the repetition penalty and n-gram block over the sequence so far `tokens` come first."""
    check_sampling(temperature, top_p)
    logits = process_logits(logits, tokens, repetition_penalty, no_repeat_ngram_size)
    if temperature == 0:
        return int(logits.argmax())
    # the largest logit is subtracted before dividing (softmax is unchanged by it): logit / temperature
    # overflowed to inf for a tiny temperature (20 / 1e-307) and the probabilities became NaN
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / temperature, dim=-1)
    order = probs.argsort(descending=True)
    sorted_probs = probs[order]
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    kept = sorted_probs * keep
    choice = torch.multinomial((kept / kept.sum()).float(), 1, generator=generator)
    return int(order[choice])


def check_length(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Raise before any work when max_new_tokens is not an integer >= 0 or the prompt and its
    continuation cannot fit the model's context (the last new token is never fed back, hence the + 1)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 0 (--max-new-tokens)")
    if prompt_tokens > max_seq_len:  # no --max-new-tokens fits: only a shorter prompt does
        longest = min(max_seq_len, max_seq_len + 1 - max_new_tokens)
        fix = (
            f"shorten the prompt to at most {longest} tokens (keep its end)"
            if longest > 0
            else f"make prompt + --max-new-tokens at most {max_seq_len + 1}"
        )
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens, longer than the model's "
            f"max_seq_len of {max_seq_len}: {fix}; nothing is cut"
        )
    if prompt_tokens + max_new_tokens > max_seq_len + 1:
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for, "
            f"but the model's max_seq_len is {max_seq_len}: shorten the prompt or lower "
            f"--max-new-tokens to at most {max_seq_len + 1 - prompt_tokens}"
        )


def accepts_cache(model) -> bool:
    return "cache" in inspect.signature(model.forward).parameters


@torch.no_grad()
def generate(
    model,
    prompt: list[int],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    seed: int = 0,
    use_cache: bool = True,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> list[int]:
    """Token ids continuing `prompt` (not included); stops at eos_id when given. The repetition
    penalty (1.0 = off) and the n-gram block (0 = off) see the prompt and the tokens generated."""
    check_penalties(repetition_penalty, no_repeat_ngram_size)
    check_sampling(temperature, top_p)
    if not prompt:
        raise ValueError("generate needs a non-empty prompt (start it with the tokenizer's eos id)")
    check_length(len(prompt), max_new_tokens, model.cfg.max_seq_len)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    cache = KVCache(len(model.layers)) if use_cache and accepts_cache(model) else None
    tokens = list(prompt)
    feed = torch.tensor([tokens], device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(feed, cache=cache) if cache is not None else model(feed)
        token = next_token(
            logits[0, -1].float().cpu(),
            temperature,
            top_p,
            generator,
            tokens,
            repetition_penalty,
            no_repeat_ngram_size,
        )
        if eos_id is not None and token == eos_id:
            break
        tokens.append(token)
        out.append(token)
        feed = torch.tensor([[token]] if cache is not None else [tokens], device=device)
    return out


def answer_probes(model, tokenizer, probes, max_new_tokens: int | None = None) -> dict:
    """Greedy answers to fact probes ("<eos> question" -> answer); exact-match accuracy and the rows."""
    rows, correct = [], 0
    probes = [p for p in probes if fits(p, tokenizer, model.cfg.max_seq_len)]  # as pretrain.evaluate skips them
    for probe in probes:
        question = tokenizer.encode(probe.question)
        target = answer_tokens(probe, tokenizer, question)
        budget = max_new_tokens or len(target)
        prompt = [tokenizer.eos_id] + question
        got = generate(model, prompt, min(budget, model.cfg.max_seq_len + 1 - len(prompt)))
        hit = got[: len(target)] == target
        correct += hit
        rows.append(
            {"question": probe.question, "answer": probe.answer, "generated": tokenizer.decode(got), "correct": hit}
        )
    chance = sum(p.chance for p in probes) / max(len(probes), 1)
    return {"accuracy": correct / max(len(probes), 1), "chance": chance, "count": len(probes), "rows": rows}


def fits(probe, tokenizer, max_seq_len: int) -> bool:
    """Whether "<eos> question answer" minus its last token fits the context."""
    question = tokenizer.encode(probe.question)
    return len(question) + len(answer_tokens(probe, tokenizer, question)) <= max_seq_len
