"""The finetuning loop: epochs of batches through one method, evaluated every few epochs."""

from __future__ import annotations

import time
from typing import Callable

from pretrain.smf.dataset import FinetuneSet


def finetune(
    method,
    data: FinetuneSet,
    epochs: int,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    evaluate: Callable | None = None,
    log: Callable[[str], None] | None = print,
    eval_every: int = 1,
) -> list[dict]:
    """Train `method` for `epochs` passes over `data`; returns one record per epoch (mean loss,
    steps, seconds, and `evaluate(model)`'s metrics every `eval_every` epochs and after the last)."""
    if epochs <= 0 or eval_every <= 0:
        raise ValueError(f"epochs={epochs} and eval_every={eval_every} must be positive")
    history, steps, start = [], 0, time.perf_counter()
    for epoch in range(epochs):
        losses = [method.step(batch) for batch in data.batches(batch_size, shuffle, seed, epoch)]
        steps += len(losses)
        record = {
            "epoch": epoch + 1,
            "steps": steps,
            "loss": sum(losses) / len(losses),
            "seconds": time.perf_counter() - start,
        }
        if evaluate is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            record.update(evaluate(method.model))
        history.append(record)
        if log is not None:
            log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
    return history
