"""Sampling from a loaded model (greedy, temperature, nucleus/top-p) and the fact-probe quiz.

Generation keeps a key/value cache (`pretrain.model.kv_cache`): the prompt runs once, then
each step feeds only the new token, so every token's attention keys and memory lookup are
computed once. `use_cache=False` (or a model whose forward takes no cache) recomputes the
whole sequence each step: the reference the cached path is tested against. Prompt plus new
tokens must fit in the model's max_seq_len.
"""

from __future__ import annotations

import inspect

import torch

from pretrain.model.kv_cache import KVCache


def next_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """One token id from final-position logits (vocab,): argmax at temperature 0, else nucleus sampling."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True)
    sorted_probs = probs[order]
    # keep the smallest prefix whose mass reaches top_p (always at least the top token)
    keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
    kept = sorted_probs * keep
    choice = torch.multinomial((kept / kept.sum()).float(), 1, generator=generator)
    return int(order[choice])


def check_length(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Raise before any work when the prompt and its continuation cannot fit the model's context
    (the last new token is never fed back, hence the + 1)."""
    if prompt_tokens > max_seq_len or prompt_tokens + max_new_tokens > max_seq_len + 1:
        raise ValueError(
            f"the prompt is {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for, "
            f"but the model's max_seq_len is {max_seq_len}: shorten the prompt or lower "
            f"--max-new-tokens to at most {max(max_seq_len + 1 - prompt_tokens, 0)}"
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
) -> list[int]:
    """Token ids continuing `prompt` (not included); stops at eos_id when given."""
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
        token = next_token(logits[0, -1].float().cpu(), temperature, top_p, generator)
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


def answer_tokens(probe, tokenizer, question: list[int]) -> list[int]:
    """The answer's tokens as they follow the question (tokenization may merge across the space)."""
    full = tokenizer.encode(f"{probe.question} {probe.answer}")
    target = full[len(question) :] if full[: len(question)] == question else []
    return target or tokenizer.encode(probe.answer)


def fits(probe, tokenizer, max_seq_len: int) -> bool:
    """Whether "<eos> question answer" minus its last token fits the context."""
    question = tokenizer.encode(probe.question)
    return len(question) + len(answer_tokens(probe, tokenizer, question)) <= max_seq_len
