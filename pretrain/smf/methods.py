"""The three ways to finetune an exported model on new data, behind one `step(batch)`.

- `SparseMemoryFinetuning` (Lin et al., 2025): every parameter is frozen except the value
  tables, and of those only the rows of the batch's top-t TF-IDF slots change, by plain
  SGD (w[rows] -= lr * grad[rows]); every other row stays bitwise identical.
- `FullFinetuning`: AdamW on every parameter.
- `LoRAFinetuning`: low-rank adapters (peft) on the attention and dense-FFN projections,
  trained with AdamW and merged back into the weights by `finished_model()`.
"""
from __future__ import annotations

import torch

from pretrain.model import Transformer, language_model_loss
from pretrain.slots import SlotTable
from pretrain.smf.dataset import FinetuneBatch
from pretrain.smf.selection import SlotSelector

METHODS = ("sparse", "full", "lora")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention and SwiGLU projections


def batch_loss(model: torch.nn.Module, batch: FinetuneBatch) -> torch.Tensor:
    device = next(model.parameters()).device
    return language_model_loss(model(batch.tokens.to(device)), batch.targets.to(device))


class SparseMemoryFinetuning:
    name = "sparse"

    def __init__(self, model: Transformer, table: SlotTable, top_t: int, lr: float):
        if lr <= 0:
            raise ValueError(f"lr={lr} must be positive (the paper uses SGD with lr about 2 to 5)")
        self.model, self.lr = model, lr
        self.selector = SlotSelector(model, table, top_t)
        for p in model.parameters():
            p.requires_grad_(False)
        for values in model.values:
            values.weight.requires_grad_(True)
        self.last_rows: dict[int, torch.Tensor] = {}
        self.rows_updated = 0  # over all steps, with repeats

    def step(self, batch: FinetuneBatch) -> float:
        loss = batch_loss(self.model, batch)
        rows = self.selector.select(batch.keep)
        for values in self.model.values:
            values.weight.grad = None
        loss.backward()
        with torch.no_grad():
            for table, r in rows.items():
                weight = self.model.values[table].weight
                r = r.to(weight.device)
                weight.index_add_(0, r, weight.grad.index_select(0, r), alpha=-self.lr)
        for values in self.model.values:
            values.weight.grad = None
        self.last_rows = rows
        self.rows_updated += sum(int(r.numel()) for r in rows.values())
        return loss.item()

    def finished_model(self) -> Transformer:
        return self.model


class FullFinetuning:
    name = "full"

    def __init__(self, model: Transformer, lr: float, weight_decay: float = 0.0):
        self.model = model
        for p in model.parameters():
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

    def step(self, batch: FinetuneBatch) -> float:
        loss = batch_loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def finished_model(self) -> Transformer:
        return self.model


class LoRAFinetuning:
    name = "lora"

    def __init__(self, model: Transformer, rank: int, lr: float, alpha: float | None = None,
                 targets: tuple[str, ...] = LORA_TARGETS):
        from peft import LoraConfig, get_peft_model

        if rank <= 0:
            raise ValueError(f"LoRA rank={rank} must be positive")
        config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else 2 * rank,
                            target_modules=list(targets), lora_dropout=0.0, bias="none")
        self.peft_model = get_peft_model(model, config)
        params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.model = self.peft_model

    def step(self, batch: FinetuneBatch) -> float:
        loss = batch_loss(self.peft_model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def finished_model(self) -> Transformer:
        """The plain Transformer with the adapters merged into its weights."""
        return self.peft_model.merge_and_unload()


def build_method(name: str, model: Transformer, *, lr: float, table: SlotTable | None = None, top_t: int = 500,
                 lora_rank: int = 8, weight_decay: float = 0.0):
    if name == "sparse":
        if table is None:
            raise ValueError("sparse memory finetuning needs the pretraining slot table (the export's "
                             "slot_frequencies.safetensors)")
        return SparseMemoryFinetuning(model, table, top_t, lr)
    if name == "full":
        return FullFinetuning(model, lr, weight_decay)
    if name == "lora":
        return LoRAFinetuning(model, lora_rank, lr)
    raise ValueError(f"method={name!r} must be one of {', '.join(METHODS)}")
