"""Evaluation: validation loss/perplexity (per mixture source and weighted), fact recall on probes;
`Evaluator`, the training loop's evaluation of a run's sources and probes.

Fact recall is greedy exact match: the model, fed "<eos> question answer" with teacher
forcing, must predict every answer token as its argmax. Under teacher forcing that is
exactly the condition for greedy decoding to produce the answer, computed in one
batched forward instead of a token-by-token loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import record_function

from pretrain import profiler_regions as regions
from pretrain.data import load_probes
from pretrain.data.errors import DataError
from pretrain.data.loader import IGNORE_INDEX
from pretrain.data.loader_failures import read_all
from pretrain.distributed import refusal_shared

if TYPE_CHECKING:
    from pretrain.config import RunConfig
    from pretrain.metrics import MetricsLogger


class EvaluationStopped(Exception):
    """A stop request ended an evaluation between two batches: what was computed is no result."""


def check_stop(should_stop: Callable[[], bool] | None, part: str) -> None:
    """Before each evaluation forward: EvaluationStopped once `should_stop` says so. It is the
    ranks' agreed stop request (a collective): every rank calls it before each of as many forwards
    (the padding below), so all stop at the same batch and none waits in a collective for a peer."""
    if should_stop is not None and should_stop():
        raise EvaluationStopped(part)


@dataclass
class ProbeBatch:
    tokens: torch.Tensor  # (P, L) input ids, right-padded
    answer_mask: torch.Tensor  # (P, L) True where the *target* is an answer token
    targets: torch.Tensor  # (P, L)
    chance: torch.Tensor  # (P,)


def answer_tokens(probe, tokenizer, question: list[int]) -> list[int]:
    """The answer's tokens as they follow the question's tokens `question` (tokenization may merge
    across the space): what the question+answer adds, else the answer encoded alone. The one
    definition of a probe's answer for fact recall, the generation quiz and the lm-eval tasks."""
    full = tokenizer.encode(f"{probe.question} {probe.answer}")
    target = full[len(question) :] if full[: len(question)] == question else []
    return target or tokenizer.encode(probe.answer)


def encode_probes(probes, tokenizer, max_len: int) -> ProbeBatch | None:
    """Tokenise question/answer pairs ("<eos> question answer", `answer_tokens`); a probe whose
    row minus its last token is longer than `max_len` is left out."""
    rows, chances = [], []
    for probe in probes:
        question = tokenizer.encode(probe.question)
        seq = [tokenizer.eos_id] + question + answer_tokens(probe, tokenizer, question)
        if len(seq) - 1 > max_len:
            continue
        rows.append((seq, len(question) + 1))
        chances.append(probe.chance)
    if not rows:
        return None
    length = max(len(seq) for seq, _ in rows) - 1
    tokens = torch.zeros(len(rows), length, dtype=torch.long)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, (seq, answer_start) in enumerate(rows):
        n = len(seq) - 1
        tokens[i, :n] = torch.tensor(seq[:-1])
        targets[i, :n] = torch.tensor(seq[1:])
        mask[i, answer_start - 1 : n] = True
    return ProbeBatch(tokens, mask, targets, torch.tensor(chances, dtype=torch.float64))


def load_seen_probes(cfg: RunConfig, sources: list, tokenizer, metrics: MetricsLogger) -> ProbeBatch | None:
    """The fact-recall probes of the first source that has them (new facts are never trained
    on, so left out), encoded; None if no source has probes."""
    probes = None
    with_probes = [s for s in sources if s.has_probes]
    if with_probes:
        seen_facts = [p for p in load_probes(with_probes[0].dir) if not p.is_new_fact]
        probes = encode_probes(seen_facts[: cfg.train.probe_limit], tokenizer, cfg.data.seq_len)
    else:
        metrics.line("data: no probes.jsonl in the data: fact recall is not evaluated (validation loss is)")
    for s in sources:
        if not s.has_validation:
            metrics.line(f"data: source {s.name} ({s.dir}) has no validation sequences: not evaluated")
    return probes


@torch.no_grad()
def fact_recall(
    model: nn.Module,
    batch: ProbeBatch,
    device: torch.device,
    micro_batch: int = 64,
    rank: int = 0,
    world_size: int = 1,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Fraction of probes whose answer is the greedy continuation, and the chance level.

    With `world_size` > 1 the probes are cut into contiguous parts (rank 0's first, sizes within
    a probe of each other), each rank asks its own part and the hit counts are all-reduced, so
    every rank reports what one rank asking them all reports. A rank with fewer forwards runs
    one-row forwards with nothing scored, as `padded_to_longest` does for validation: the
    collectives inside the model (a memory group's value lookup, ZeRO-3's gathers) must pair up.
    `should_stop`: `check_stop`'s, before each forward."""
    n = batch.tokens.shape[0]
    first, end = n * rank // world_size, n * (rank + 1) // world_size
    starts = list(range(first, end, micro_batch))
    padding = 0
    if world_size > 1:
        from pretrain.distributed import global_max

        padding = global_max(len(starts)) - len(starts)
    hits = torch.zeros(2, dtype=torch.float64)  # [probes answered, probes asked]
    for start in starts:
        check_stop(should_stop, "fact recall")
        stop = min(start + micro_batch, end)
        tokens = batch.tokens[start:stop].to(device)
        targets = batch.targets[start:stop].to(device)
        mask = batch.answer_mask[start:stop].to(device)
        predicted = model(tokens).argmax(dim=-1)
        hit = (predicted == targets) | ~mask
        hits += torch.tensor([hit.all(dim=-1).sum().item(), stop - start], dtype=torch.float64)
    for _ in range(padding):
        check_stop(should_stop, "fact recall")
        model(torch.zeros(1, batch.tokens.shape[1], dtype=torch.long, device=device))
    if world_size > 1:
        total = hits.to(device)
        dist.all_reduce(total)
        hits = total.cpu()
    return {"fact_recall": (hits[0] / hits[1]).item(), "fact_recall_chance": batch.chance.mean().item()}


def padded_to_longest(batches: list, seq_len: int) -> list:
    """`batches`, and after them as many batches of one row with nothing scored as another rank
    has batches more (one all-reduce): every rank then runs as many forwards, whose collectives
    (a memory group's value lookup, ZeRO-3's parameter gathers) must pair up across ranks."""
    from pretrain.data.loader import Batch
    from pretrain.distributed import global_max

    missing = global_max(len(batches)) - len(batches)
    empty = Batch(
        tokens=torch.zeros(1, seq_len, dtype=torch.long),
        targets=torch.full((1, seq_len), IGNORE_INDEX, dtype=torch.long),
        doc_ids=torch.zeros(1, seq_len, dtype=torch.long),
    )
    return list(batches) + [empty] * missing


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    batches,
    device: torch.device,
    document_masking: bool = False,
    should_stop: Callable[[], bool] | None = None,
    part: str = "validation",
) -> dict:
    """Mean loss per scored target over the given validation batches and over ranks (each rank
    passes its own rows; padding targets are not scored, so a split's padded last row weighs
    what its real targets weigh);
    `document_masking`: attention stays within each document, as in training (data.document_masking);
    `should_stop`: `check_stop`'s before each batch (every rank passes as many, `padded_to_longest`)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [summed loss, scored targets]
    for batch in batches:
        check_stop(should_stop, part)
        logits = model(batch.tokens.to(device), doc_ids=batch.doc_ids.to(device) if document_masking else None)
        targets = batch.targets.to(device)
        summed = F.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        total += torch.stack([summed.double(), (targets != IGNORE_INDEX).sum().double()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    if total[1] == 0:
        return {}
    loss = (total[0] / total[1]).item()
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def weighted_validation(per_source: dict[str, tuple[float, dict]]) -> dict:
    """Combine `validation_loss` results {name: (weight, result)} of a mixture's sources.

    Each source's loss is reported as val_loss/<name>; val_loss is their mean weighted by the
    mixture weights (renormalised over the sources that have a result), val_perplexity its exp.
    A single source reports only val_loss and val_perplexity, as before mixtures.
    """
    scored = {name: (weight, out["val_loss"]) for name, (weight, out) in per_source.items() if "val_loss" in out}
    if not scored:
        return {}
    if len(scored) == 1:
        loss = next(iter(scored.values()))[1]
    else:
        total_weight = sum(w for w, _ in scored.values())
        loss = sum(w * v for w, v in scored.values()) / total_weight
    out = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
    if len(per_source) > 1:
        out.update({f"val_loss/{name}": v for name, (_, v) in scored.items()})
    return out


def mixture_validation(per_source: dict) -> dict:
    """val_loss/<source> for each source and their weighted mean as val_loss (one source: its own)."""
    return weighted_validation({s.name: (s.weight, out) for s, out in per_source.items()})


class Evaluator:
    """Validation loss per source (and their weighted mean) plus fact recall on the probes.

    The rows an evaluation reads are split across the ranks (`rank` of `world_size`), each read
    once, and the loss sums all-reduced: the loss is the one a single rank reading them all gets,
    at 1/world_size of its work per rank."""

    def __init__(
        self,
        cfg: RunConfig,
        sources: list,
        probes,
        loaders: Callable[..., Any],  # pretrain.build.LoaderFactory: build_loader's signature
        device: torch.device,
        heldout: list = (),
        rank: int = 0,
        world_size: int = 1,
    ):
        self.cfg, self.probes, self.loaders, self.device = cfg, probes, loaders, device
        self.sources = [s for s in sources if s.has_validation]
        self.heldout = list(heldout)  # data.eval_sources: evaluated, never trained on
        self.rank, self.world_size = rank, world_size

    @record_function(regions.EVAL)
    def __call__(self, engine, should_stop: Callable[[], bool] | None = None) -> dict:
        """The evaluation's results. `should_stop`: the ranks' agreed stop request (StopSignal's
        should_stop), asked before each forward: EvaluationStopped at the first True, on every rank
        at the same batch (a signal must not wait for thousands of rows and probes: under SIGTERM
        Slurm kills the job KillWait, often 30 s, after it)."""
        engine.eval()
        try:
            per_source = {source: self.loss_on(engine, source, "val", should_stop) for source in self.sources}
            out = mixture_validation(per_source)
            for source in self.heldout:
                split = "val" if source.has_validation else "train"
                loss = self.loss_on(engine, source, split, should_stop, part=f"held-out source {source.name}")
                out[f"heldout_loss/{source.name}"] = loss.get("val_loss", float("nan"))
            if self.probes is not None:
                out.update(
                    fact_recall(
                        engine,
                        self.probes,
                        self.device,
                        rank=self.rank,
                        world_size=self.world_size,
                        should_stop=should_stop,
                    )
                )
        finally:
            engine.train()
        return out

    def scope_line(self) -> str:
        """The rows each evaluation scores, said once at start-up: the first train.eval_batches x
        train.micro_batch rows of each split, so its val_loss is not memlayers-perplexity's over the whole
        split (5.516 against 5.602 on a 52,000-token split)."""
        t = self.cfg.train
        rows = t.eval_batches * t.micro_batch
        scored = [(f"val_loss/{s.name}" if len(self.sources) > 1 else "val_loss", s, "val") for s in self.sources]
        scored += [(f"heldout_loss/{s.name}", s, "val" if s.has_validation else "train") for s in self.heldout]
        parts = []
        for name, source, split in scored:
            total = int(source.manifest["splits"][split]["sequences"])
            part = (
                f"all {total:,} {split} sequences"
                if rows >= total
                else f"the first {rows:,} of {total:,} {split} sequences"
            )
            parts.append(f"{name} over {part} of {source.name}")
        if not parts:
            return "eval: no validation split to score"
        return (
            f"eval: {', '.join(parts)} (train.eval_batches x train.micro_batch = {t.eval_batches} x {t.micro_batch} "
            "rows; memlayers-perplexity scores a whole split)"
        )

    def loss_on(
        self, engine, source, split: str, should_stop: Callable[[], bool] | None = None, part: str | None = None
    ) -> dict:
        """validation_loss over the first train.eval_batches x train.micro_batch rows of `source`'s
        `split` (a shorter split whole), each read once by one rank: the ranks read contiguous parts
        of them (within a row of each other in size) in batches of train.micro_batch."""
        t = self.cfg.train
        rows = t.eval_batches * t.micro_batch
        loader = self.loaders(self.cfg, source.dir, split, self.rank, self.world_size, loop=False, rows=rows)
        # a read that fails on one rank (a corrupt shard, one its node cannot read) stops every rank;
        # raised on that rank alone, it left the others waiting in padded_to_longest's all-reduce
        with refusal_shared(DataError):
            read = read_all(loader, f"the evaluation data loader failed (source {source.name}, split {split})")
        batches = padded_to_longest(read, self.cfg.data.seq_len)
        part = part or f"validation of source {source.name}"
        return validation_loss(engine, batches, self.device, self.cfg.data.document_masking, should_stop, part)
