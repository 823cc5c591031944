"""The three ways to finetune an exported model on new data, behind one `step(batch)`.

- `SparseMemoryFinetuning` (Lin et al., 2025): every parameter is frozen and only the
  value rows of the batch's top-t TF-IDF slots change, by plain SGD
  (w[rows] -= lr * grad[rows]); every other row stays bitwise identical. The gradient of
  just those rows is computed from dL/dbag (`BagGradientCapture`), so a step never
  holds an (N, v_dim) gradient: the cost scales with the batch, not the pool.
- `FullFinetuning`: AdamW on every parameter.
- `LoRAFinetuning`: low-rank adapters (peft) on the attention and dense-FFN projections,
  trained with AdamW and merged back into the weights by `finished_model()`.
"""

from __future__ import annotations

import torch

import kernels
from pretrain.model import Transformer, language_model_loss
from pretrain.slots import TABLE_FILENAME, SlotTable
from pretrain.smf.dataset import FinetuneBatch
from pretrain.smf.selection import SlotSelector

METHODS = ("sparse", "full", "lora")
LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention and SwiGLU projections


def batch_loss(model: torch.nn.Module, batch: FinetuneBatch) -> torch.Tensor:
    device = next(model.parameters()).device
    return language_model_loss(model(batch.tokens.to(device)), batch.targets.to(device))


class BagGradientCapture(torch.nn.Module):
    """Stands in for a `ValueTable` during a sparse step: computes the bag without autograd
    through the table's rows and keeps, per call, (indices, weights, dL/dbag), from which the
    gradient of any chosen rows follows without an (N, v_dim) gradient tensor."""

    def __init__(self, table: torch.nn.Module):
        super().__init__()
        self.table, self.v_dim = table, table.v_dim
        self.calls: list[list] = []

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # Detached rows, live weights: with several memory layers, an earlier layer's rows
        # also reach the loss through this layer's query and softmax weights.
        bag = kernels.embedding_bag(self.table.weight.detach(), indices, weights, backend=self.table.kernel)
        if not bag.requires_grad:
            bag.requires_grad_(True)
        call = [indices, weights.detach(), None]
        bag.register_hook(lambda grad: call.__setitem__(2, grad))
        self.calls.append(call)
        return bag

    def row_gradient(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), v_dim) gradient of the loss w.r.t. the table's `rows` (sorted, unique)."""
        weight = self.table.weight
        position = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        position[rows] = torch.arange(rows.numel(), device=weight.device)
        acc = torch.promote_types(weight.dtype, torch.float32)  # fp32 accumulation for bf16 tables
        grad = torch.zeros(rows.numel(), self.v_dim, dtype=acc, device=weight.device)
        for indices, weights, bag_grad in self.calls:
            if bag_grad is None:
                continue
            flat = indices.reshape(indices.shape[0], -1)  # (tokens, heads * k)
            pos = position[flat]
            token, slot = (pos >= 0).nonzero(as_tuple=True)
            contribution = weights.reshape(flat.shape)[token, slot, None].to(acc) * bag_grad[token].to(acc)
            grad.index_add_(0, pos[token, slot], contribution)
        return grad.to(weight.dtype)


class SparseMemoryFinetuning:
    name = "sparse"

    def __init__(self, model: Transformer, table: SlotTable, top_t: int, lr: float, max_grad_norm: float = 0.0):
        if lr <= 0:
            raise ValueError(f"lr={lr} must be positive (the paper uses SGD with lr about 2 to 5)")
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm={max_grad_norm} must be >= 0 (0 = no clipping)")
        self.model, self.lr, self.max_grad_norm = model, lr, max_grad_norm
        self.selector = SlotSelector(model, table, top_t)
        for p in model.parameters():  # nothing is trained through autograd; the rows are updated by hand
            p.requires_grad_(False)
        self.last_rows: dict[int, torch.Tensor] = {}
        self.last_grad_norm = 0.0
        self.rows_updated = 0  # over all steps, with repeats

    def step(self, batch: FinetuneBatch) -> float:
        tables = self.model.values
        captures = [BagGradientCapture(t) for t in tables]
        for i, capture in enumerate(captures):
            tables[i] = capture
        try:
            loss = batch_loss(self.model, batch)
            rows = self.selector.select(batch.keep)
            loss.backward()
        finally:
            for i, capture in enumerate(captures):
                tables[i] = capture.table
        with torch.no_grad():
            rows = {t: r.to(tables[t].weight.device) for t, r in rows.items()}
            grads = {t: captures[t].row_gradient(r) for t, r in rows.items()}
            self.last_grad_norm = float(sum(g.float().square().sum() for g in grads.values()) ** 0.5)
            scale = 1.0
            if self.max_grad_norm and self.last_grad_norm > self.max_grad_norm:
                scale = self.max_grad_norm / self.last_grad_norm
            for t, r in rows.items():
                tables[t].weight.index_add_(0, r, grads[t], alpha=-self.lr * scale)
        self.last_rows = rows
        self.rows_updated += sum(int(r.numel()) for r in rows.values())
        return loss.item()

    def finished_model(self) -> Transformer:
        return self.model


class AdamWFinetuning:
    """AdamW on the parameters of `model` that require grad (the baselines' shared step)."""

    name = "adamw"

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float = 0.0):
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)

    def step(self, batch: FinetuneBatch) -> float:
        loss = batch_loss(self.model, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def finished_model(self) -> Transformer:
        return self.model


class FullFinetuning(AdamWFinetuning):
    name = "full"

    def __init__(self, model: Transformer, lr: float, weight_decay: float = 0.0):
        for p in model.parameters():
            p.requires_grad_(True)
        super().__init__(model, lr, weight_decay)


def check_lora_rank(model: torch.nn.Module, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> None:
    """A ValueError where `rank` is not positive or exceeds every adapted projection's own rank
    (min of its in and out features): such an adapter spans no more updates, at more weights and
    time (--lora-rank 100000 on the tiny export ran minutes without a word)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank={rank} must be positive")
    ranks = [
        min(m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    if ranks and rank > max(ranks):
        raise ValueError(
            f"LoRA rank={rank} exceeds the rank of every adapted projection ({', '.join(targets)}: at most "
            f"{max(ranks)}, min of in and out features): a higher rank spans no more updates; give at most {max(ranks)}"
        )


class LoRAFinetuning(AdamWFinetuning):
    name = "lora"

    def __init__(
        self,
        model: Transformer,
        rank: int,
        lr: float,
        alpha: float | None = None,
        targets: tuple[str, ...] = LORA_TARGETS,
        weight_decay: float = 0.0,
    ):
        from peft import LoraConfig, get_peft_model

        check_lora_rank(model, rank, targets)
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else 2 * rank,
            target_modules=list(targets),
            lora_dropout=0.0,
            bias="none",
        )
        # peft freezes everything but the adapters
        super().__init__(get_peft_model(model, config), lr, weight_decay)

    def finished_model(self) -> Transformer:
        """The plain Transformer with the adapters merged into its weights."""
        return self.model.merge_and_unload()


def build_method(
    name: str,
    model: Transformer,
    *,
    lr: float,
    table: SlotTable | None = None,
    top_t: int = 500,
    lora_rank: int = 8,
    weight_decay: float = 0.0,
    max_grad_norm: float = 0.0,
):
    if name == "sparse":
        if table is None:
            raise ValueError(
                f"sparse memory finetuning needs the pretraining slot table (the export's {TABLE_FILENAME})"
            )
        return SparseMemoryFinetuning(model, table, top_t, lr, max_grad_norm)
    if name == "full":
        return FullFinetuning(model, lr, weight_decay)
    if name == "lora":
        return LoRAFinetuning(model, lora_rank, lr, weight_decay=weight_decay)
    raise ValueError(f"method={name!r} must be one of {', '.join(METHODS)}")
