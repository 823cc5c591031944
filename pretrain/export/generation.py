"""Sampling from a loaded model (greedy, temperature, nucleus/top-p) and the fact-probe quiz.

Generation recomputes the full sequence each step (the model has no key/value cache);
the context is cut to the model's max_seq_len from the left.
"""
from __future__ import annotations

import torch


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


@torch.no_grad()
def generate(model, prompt: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
             eos_id: int | None = None, seed: int = 0) -> list[int]:
    """Token ids continuing `prompt` (not included); stops at eos_id when given."""
    device = next(model.parameters()).device
    max_len = model.cfg.max_seq_len
    generator = torch.Generator().manual_seed(seed)
    tokens = list(prompt)
    out: list[int] = []
    for _ in range(max_new_tokens):
        context = torch.tensor([tokens[-max_len:]], device=device)
        token = next_token(model(context)[0, -1].float().cpu(), temperature, top_p, generator)
        if eos_id is not None and token == eos_id:
            break
        tokens.append(token)
        out.append(token)
    return out


def answer_probes(model, tokenizer, probes, max_new_tokens: int | None = None) -> dict:
    """Greedy answers to fact probes ("<eos> question" -> answer); exact-match accuracy and the rows."""
    rows, correct = [], 0
    for probe in probes:
        question = tokenizer.encode(probe.question)
        full = tokenizer.encode(f"{probe.question} {probe.answer}")
        # the answer's tokens as they follow the question (tokenization may merge across the space)
        target = full[len(question):] if full[: len(question)] == question else []
        target = target or tokenizer.encode(probe.answer)
        budget = max_new_tokens or len(target)
        got = generate(model, [tokenizer.eos_id] + question, budget)
        hit = got[: len(target)] == target
        correct += hit
        rows.append({"question": probe.question, "answer": probe.answer, "generated": tokenizer.decode(got),
                     "correct": hit})
    chance = sum(p.chance for p in probes) / max(len(probes), 1)
    return {"accuracy": correct / max(len(probes), 1), "chance": chance, "count": len(probes), "rows": rows}
