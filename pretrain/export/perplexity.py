"""`dataset_loss`: an export's next-token loss and perplexity over one split of a prepared
dataset (tools/prepare_data.py), read once in order: how users compare exports (averaged
or not, another run, another corpus) on the same text.

The loss is the sum of the cross-entropies of every target token (padding excluded),
accumulated in float64, over the number of those tokens: each token counts once, however
the batches fall. The dataset must have been prepared with the export's tokenizer (checked
by hash before the model runs). Attention stays within each document when the run trained
that way (`data.document_masking`, recorded in the export's config.json), unless told otherwise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from pretrain.data import ShardLoader, read_manifest
from pretrain.data.loader import IGNORE_INDEX
from pretrain.export.loading import export_tokenizer
from pretrain.progress_bars import progress_bar


@torch.no_grad()
def dataset_loss(
    export_dir: str | Path,
    dataset_dir: str | Path,
    split: str = "val",
    batch_size: int = 8,
    max_batches: int = 0,
    document_masking: bool | None = None,
    device: str = "cpu",
    show_progress: bool = True,
    model=None,
) -> dict:
    """{"loss", "perplexity", "tokens", "sequences", "document_masking"} of the export (or `model`,
    already loaded from it) on `split` of `dataset_dir`; `max_batches` > 0 reads only that many
    batches. `document_masking` None: as the run trained (`trained_with_document_masking`)."""
    from pretrain.export.loading import load, model_config_from_json

    if max_batches < 0:  # the `> 0` tests below would read the whole split
        raise ValueError(f"max_batches={max_batches} must be >= 0 (0: the whole split)")
    tokenizer = export_tokenizer(export_dir)
    manifest = read_manifest(dataset_dir)
    cfg = model_config_from_json(Path(export_dir) / "config.json")
    if document_masking is None:
        document_masking = trained_with_document_masking(export_dir)
    if manifest["seq_len"] > cfg.max_seq_len:
        raise ValueError(
            f"{dataset_dir} holds sequences of {manifest['seq_len']} tokens, longer than the export's "
            f"model.max_seq_len={cfg.max_seq_len}: prepare the data with --seq-len {cfg.max_seq_len} or less"
        )
    loader = ShardLoader(dataset_dir, split, batch_size=batch_size, loop=False, tokenizer=tokenizer)
    model = load(export_dir, device) if model is None else model
    total_batches = math.ceil(manifest["splits"][split]["sequences"] / batch_size)
    if max_batches > 0:
        total_batches = min(total_batches, max_batches)
    nll, tokens, sequences = 0.0, 0, 0
    bar = progress_bar(total=total_batches, unit="batch", desc=f"loss on {split}", disable=not show_progress)
    for i, batch in enumerate(loader):
        if max_batches > 0 and i >= max_batches:
            break
        logits = model(batch.tokens.to(device), doc_ids=batch.doc_ids.to(device) if document_masking else None)
        targets = batch.targets.to(device)
        nll += (
            F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
            .double()
            .item()
        )
        tokens += int((targets != IGNORE_INDEX).sum())
        sequences += batch.tokens.shape[0]
        bar.update()
    bar.close()
    if tokens == 0:
        raise ValueError(f"split {split!r} of {dataset_dir} holds no token to score")
    loss = nll / tokens
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": tokens,
        "sequences": sequences,
        "document_masking": document_masking,
    }


def trained_with_document_masking(export_dir: str | Path) -> bool:
    """Whether the run the export comes from kept attention within documents (data.document_masking;
    False for exports written before config.json recorded it). Scored without it, such a model
    attends to neighbouring documents as it never did in training, and its loss rises."""
    config = json.loads((Path(export_dir) / "config.json").read_text())
    return bool(config.get("memlayers", {}).get("document_masking", False))
