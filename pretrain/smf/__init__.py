"""Sparse memory finetuning (Lin et al., 2025), seeded by the pretraining slot tables.

Learn new data by updating only the value rows of each batch's top-t TF-IDF slots, with
full finetuning and LoRA as baselines, and measure learning (new-fact recall) against
forgetting (old-fact recall, validation loss). Modules: dataset (finetuning batches),
selection (TF-IDF top-t rows), methods (sparse / full / LoRA updates), finetune (the
loop), evaluation (learning vs forgetting), export (saving the finetuned model),
experiment (the sweep behind tools/smf_report.py) and frontier (its plot and verdict).
"""

from pretrain.smf.dataset import FinetuneBatch, FinetuneSet
from pretrain.smf.evaluation import DataLossEval, LearningForgettingEval, ValidationLossEval, combined
from pretrain.smf.export import save_finetuned_export
from pretrain.smf.finetune import finetune
from pretrain.smf.methods import (
    METHODS,
    FullFinetuning,
    LoRAFinetuning,
    SparseMemoryFinetuning,
    build_method,
)
from pretrain.smf.selection import SlotSelector

__all__ = [
    "METHODS",
    "FinetuneBatch",
    "FinetuneSet",
    "FullFinetuning",
    "DataLossEval",
    "LearningForgettingEval",
    "ValidationLossEval",
    "combined",
    "LoRAFinetuning",
    "SlotSelector",
    "SparseMemoryFinetuning",
    "build_method",
    "finetune",
    "save_finetuned_export",
]
