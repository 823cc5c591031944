"""How attention keeps to documents (data.document_masking): the masks and the FlexAttention call.

`model.document_attention` chooses:
- `sdpa`: a dense (B, 1, S, S) boolean mask passed to SDPA. Works everywhere; on a GPU the mask
  rules out SDPA's flash kernel (the memory-efficient one runs instead) and every block of the
  S x S score matrix is computed, also the blocks no query may see.
- `flex`: a FlexAttention `BlockMask` built from the same rule, run by `flex_attention` compiled
  on its own (also under train.compile, through a graph break): blocks wholly outside every document are skipped, so a row of many short
  documents costs about the sum of its documents' squares, not S^2. Training needs CUDA (torch has
  no FlexAttention backward on CPU; `check_runtime` refuses it there); the forward also runs on CPU.

Batches without document ids keep SDPA's causal path (its flash kernel) under either choice.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

_compiled_flex = None


def document_causal_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, S, S) boolean attention mask: query i sees key j <= i of the same document.

    Rotary embeddings make attention depend on relative positions only, so a document packed
    at any offset is computed as if it stood alone. Padding (doc id -1) attends to padding."""
    S = doc_ids.shape[1]
    causal = torch.ones(S, S, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)


def document_block_mask(doc_ids: torch.Tensor) -> BlockMask:
    """The same rule as `document_causal_mask`, as a FlexAttention block mask (shared by heads)."""
    B, S = doc_ids.shape
    _graph_break_around_flex()  # made here, outside any compiled block that will use it

    def same_document_causal(b, h, q, kv):
        return (doc_ids[b, q] == doc_ids[b, kv]) & (q >= kv)

    return create_block_mask(same_document_causal, B, None, S, S, device=doc_ids.device)


def document_mask(doc_ids: torch.Tensor, kind: str) -> torch.Tensor | BlockMask:
    """The mask `Attention` takes for `model.document_attention` = kind."""
    return document_block_mask(doc_ids) if kind == "flex" else document_causal_mask(doc_ids)


def _compiled_flex_attention(q, k, v, block_mask, enable_gqa):
    global _compiled_flex
    if _compiled_flex is None:
        from pretrain.compile_workers import end_compile_workers_at_exit

        end_compile_workers_at_exit()
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


# Inside a block compiled by train.compile, flex_attention is not traced into the block's graph:
# inductor's CPU lowering of it fails on the block's intermediate tensors (torch 2.13: "too many
# values to unpack" in cpp_flex_attention_template), while the function compiled on its own works.
# A graph break around the call keeps one tested path; it costs one graph split per block. Made on
# first use: torch.compiler.disable imports dynamo (and Triton), which a model import should not.
_flex_outside_graph = None


def _graph_break_around_flex():
    global _flex_outside_graph
    if _flex_outside_graph is None:
        _flex_outside_graph = torch.compiler.disable(_compiled_flex_attention, recursive=False)
    return _flex_outside_graph


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, enable_gqa: bool
) -> torch.Tensor:
    """flex_attention(q, k, v) under `block_mask`, compiled on its own (the eager function
    materialises the whole score matrix), also when called from a compiled block."""
    if torch.compiler.is_compiling():
        return _graph_break_around_flex()(q, k, v, block_mask, enable_gqa)
    return _compiled_flex_attention(q, k, v, block_mask, enable_gqa)
