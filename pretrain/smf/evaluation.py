"""Learning vs forgetting: what a finetuned model knows of the new and of the old facts.

`LearningForgettingEval` holds, encoded once:
  new facts   the probes of the held-out entities (`is_new_fact`), what finetuning teaches
  old facts   the probes of the pretraining entities, what finetuning should not forget
  validation  batches of the pretraining corpus's validation split (optional)
and `__call__(model)` returns new_fact_recall, old_fact_recall and val_loss. An export without
probes (a run on prepared text) has `DataLossEval`, the loss on the finetuning text itself (what it
learns), with `ValidationLossEval`, the validation loss (what it forgets), joined by `combined`. The validation
loss is scored as the run trained: with attention within documents when `document_masking`
(data.document_masking, recorded in the export's config.json: `trained_with_document_masking`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from pretrain.data import ShardLoader, Tokenizer, load_probes
from pretrain.evaluate import encode_probes, fact_recall, validation_loss


def validation_batches(dataset_dir: str | Path, tokenizer: Tokenizer, val_batches: int, batch_size: int) -> list:
    """The first `val_batches` batches of a prepared dataset's validation split (its tokenizer checked)."""
    loader = ShardLoader(dataset_dir, "val", batch_size=batch_size, loop=False, tokenizer=tokenizer)
    return list(itertools.islice(loader, val_batches))


class ValidationLossEval:
    """Forgetting without fact probes: the loss on batches of the pretraining corpus's validation split
    (an export of a run on prepared text, `--dataset-dir` the dataset it trained on), scored as the run
    trained (`document_masking`). `__call__(model)` returns val_loss."""

    def __init__(
        self,
        dataset_dir: str | Path,
        tokenizer: Tokenizer,
        val_batches: int = 8,
        batch_size: int = 16,
        document_masking: bool = False,
    ):
        self.val = validation_batches(dataset_dir, tokenizer, val_batches, batch_size)
        self.document_masking = document_masking

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = {"val_loss": validation_loss(model, self.val, device, self.document_masking)["val_loss"]}
        model.train(was_training)
        return out


class DataLossEval:
    """Learning without fact probes: the loss on the finetuning set itself, every row once in file
    order (padding not scored; each row is one document, or a window of one, so nothing to mask).
    `__call__(model)` returns data_loss."""

    def __init__(self, data, batch_size: int = 16):
        self.batches = list(data.batches(batch_size))

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict:
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = {"data_loss": validation_loss(model, self.batches, device)["val_loss"]}
        model.train(was_training)
        return out


def combined(*evaluators):
    """One evaluation returning every evaluator's metrics."""
    return lambda model: {name: value for evaluate in evaluators for name, value in evaluate(model).items()}


class LearningForgettingEval:
    def __init__(
        self,
        probes_dir: str | Path,
        tokenizer: Tokenizer,
        max_seq_len: int,
        dataset_dir: str | Path | None = None,
        val_batches: int = 8,
        batch_size: int = 16,
        old_probe_limit: int = 0,
        document_masking: bool = False,
    ):
        probes = load_probes(probes_dir)
        old = [p for p in probes if not p.is_new_fact]
        self.new = encode_probes([p for p in probes if p.is_new_fact], tokenizer, max_seq_len)
        self.old = encode_probes(old[:old_probe_limit] if old_probe_limit else old, tokenizer, max_seq_len)
        if self.new is None:
            raise ValueError(
                f"{probes_dir}/probes.jsonl has no new-fact probes (is_new_fact): nothing measures "
                "learning; build the corpus with data.synthetic.new_fact_fraction > 0"
            )
        self.val, self.document_masking = [], document_masking
        if dataset_dir is not None:
            self.val = validation_batches(dataset_dir, tokenizer, val_batches, batch_size)

    def guessing(self) -> dict:
        """How many new- and old-fact probes are asked and their mean chance level (a uniform guess among
        each attribute's values): what a recall is told from guessing by (the pretrained model's old-fact
        recall, and the learning of full finetuning against the pretrained model's new-fact recall)."""
        out = {"new_fact_probes": int(self.new.tokens.shape[0]), "new_fact_chance": self.new.chance.mean().item()}
        if self.old is not None:
            out.update(old_fact_probes=int(self.old.tokens.shape[0]), old_fact_chance=self.old.chance.mean().item())
        return out

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict:
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        out = {"new_fact_recall": fact_recall(model, self.new, device)["fact_recall"]}
        if self.old is not None:
            out["old_fact_recall"] = fact_recall(model, self.old, device)["fact_recall"]
        if self.val:
            out["val_loss"] = validation_loss(model, self.val, device, self.document_masking)["val_loss"]
        model.train(was_training)
        return out
