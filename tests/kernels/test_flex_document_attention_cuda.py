"""model.document_attention=flex on CUDA (tools/gpu_check.sh runs this folder there): the loss and
every gradient equal the dense-mask SDPA path's, eager and with the blocks compiled (train.compile).
Skipped without CUDA: torch has no FlexAttention backward on CPU (the forward is checked on CPU in
tests/model/test_document_masking.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention backward needs CUDA")


def packed_batch(B=2, S=300, vocab=256):
    """Rows of documents of random lengths (some longer than a 128-token block), then padding."""
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (B, S), generator=g)
    doc_ids = torch.full((B, S), -1)
    for b in range(B):
        start, doc = 0, 0
        while start < S - 20:
            length = int(torch.randint(1, 160, (1,), generator=g))
            doc_ids[b, start : start + length] = doc
            start, doc = start + length, doc + 1
    return tokens.cuda(), doc_ids.cuda()


def loss_and_grads(kind: str, compiled: bool, kv_heads: int):
    # imported here, not at collection: this folder loads the kernel modules interpreted on CPU (conftest.py)
    from pretrain.model import Transformer
    from pretrain.model.config import MemoryConfig, ModelConfig
    from pretrain.parallel.compile import apply_compile

    torch.manual_seed(0)
    memory = MemoryConfig(layers=[1], n_keys=16, heads=2, k=8, k_dim=32, kernel="torch")
    cfg = ModelConfig(
        vocab_size=256, dim=64, n_layers=3, n_heads=4, n_kv_heads=kv_heads, max_seq_len=512, memory=memory
    )
    cfg.document_attention = kind
    net = Transformer(cfg).cuda()
    if compiled:
        apply_compile(net)
    tokens, doc_ids = packed_batch()
    logits = net(tokens, doc_ids=doc_ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("kv_heads", [0, 2])
def test_flex_gradients_equal_the_dense_mask(compiled, kv_heads):
    torch.backends.cuda.matmul.allow_tf32 = False
    dense_loss, dense = loss_and_grads("sdpa", compiled, kv_heads)
    flex_loss, flex = loss_and_grads("flex", compiled, kv_heads)
    torch.testing.assert_close(flex_loss, dense_loss, rtol=1e-5, atol=1e-5)
    assert flex.keys() == dense.keys()
    for name in dense:
        torch.testing.assert_close(flex[name], dense[name], rtol=1e-4, atol=1e-5, msg=name)
