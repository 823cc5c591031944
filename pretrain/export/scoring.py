"""Batched log-likelihood of continuations through a Hugging Face causal LM (the exported model).

What lm-evaluation-harness's `loglikelihood` requests compute: for each (context ids,
continuation ids) pair, sum log p(continuation | context) and whether every continuation
token is the argmax (greedy). Rows are left-padded to a common length with an attention
mask, so the continuation's predictions sit in the last columns of every row; the model
derives position ids from the mask, so a padded row scores as it does alone. A pair longer than
the model's context (max_seq_len + 1 tokens, the last never fed) loses the start of its context,
as lm-eval truncates it: the continuation is always scored whole, and one longer than max_seq_len
is refused before any pair is scored.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def continuation_logprobs(
    model, pairs: list[tuple[list[int], list[int]]], batch_size: int = 8, pad_id: int = 0
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, is greedy) per (context, continuation) pair, in input order."""
    limit = model.config.max_seq_len
    for i, (context, continuation) in enumerate(pairs):
        if isinstance(context, str) or isinstance(continuation, str):  # torch.tensor(text) fails deep inside
            raise TypeError(
                f"pair {i}: context and continuation are token-id lists, not text: encode them with the "
                "export's tokenizer first (AutoTokenizer.from_pretrained(EXPORT, trust_remote_code=True), "
                '"</s>" + the context, and the continuation on its own)'
            )
        if not continuation:  # lm-eval's HF model asserts on one (a bare AssertionError)
            raise ValueError(
                f"pair {i} (context of {len(context)} tokens): the continuation is empty, nothing to score; "
                "drop the pair (its log-likelihood would be 0)"
            )
        if not context:
            raise ValueError(
                f"pair {i}: the context is empty: start it with the EOS id, the token lm-eval conditions "
                "an empty context on (the tokenizer's prefix token)"
            )
        if len(continuation) > limit:
            raise ValueError(
                f"pair {i}: the continuation is {len(continuation)} tokens, more than the model's "
                f"max_seq_len={limit} can score: split it, or score it with a rolling window"
            )
    device = next(model.parameters()).device
    results: list[tuple[float, bool]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        # the context's start is cut when the pair is longer than the model's context (as lm-eval does)
        rows = [(context + continuation)[-(limit + 1) :][:-1] for context, continuation in chunk]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, width - len(row) :] = torch.tensor(row)
            mask[r, width - len(row) :] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        logprobs = torch.log_softmax(logits.double(), dim=-1).cpu()
        for r, (_, continuation) in enumerate(chunk):
            n = len(continuation)
            target = torch.tensor(continuation)
            tail = logprobs[r, width - n :]
            total = tail.gather(-1, target[:, None]).sum().item()
            results.append((total, bool((tail.argmax(-1) == target).all())))
    return results
