"""Document masking (data.document_masking): a packed sequence computes each document as if it
stood alone (rotary attention depends on relative positions only), in the model and in training."""

from __future__ import annotations

import pytest
import torch

from pretrain.model import Transformer
from pretrain.model.config import MemoryConfig, ModelConfig
from pretrain.model.document_attention import document_causal_mask
from pretrain.model.kv_cache import KVCache
from pretrain.train import train
from tests.train.helpers import tiny_config

LENGTHS = (5, 9, 1, 6, 11)  # one row of 32 tokens: five documents, then padding (doc id -1)


def model() -> Transformer:
    torch.manual_seed(0)
    memory = MemoryConfig(layers=[1], n_keys=8, heads=2, k=4, k_dim=16, kernel="torch")
    return Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=4, max_seq_len=32, memory=memory)).eval()


def packed_row() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    tokens = torch.randint(0, 64, (1, 32))
    doc_ids = torch.full((1, 32), -1)
    start = 0
    for doc, length in enumerate(LENGTHS):
        doc_ids[0, start : start + length] = doc + 40  # any ids: only equality matters
        start += length
    return tokens, doc_ids


def test_mask_is_block_causal():
    _, doc_ids = packed_row()
    mask = document_causal_mask(doc_ids)[0, 0]
    for i in range(32):
        for j in range(32):
            assert bool(mask[i, j]) == (j <= i and bool(doc_ids[0, i] == doc_ids[0, j])), (i, j)


@torch.no_grad()
def test_packed_documents_equal_each_document_alone():
    net, (tokens, doc_ids) = model(), packed_row()
    packed = net(tokens, doc_ids=doc_ids)
    unmasked = net(tokens)
    start = 0
    for length in LENGTHS:
        alone = net(tokens[:, start : start + length])
        torch.testing.assert_close(packed[:, start : start + length], alone, rtol=1e-5, atol=1e-5)
        if start:  # a later document read its predecessors without the mask
            assert (unmasked[:, start : start + length] - alone).abs().max() > 1e-3
        start += length
    assert torch.isfinite(packed).all()  # padding attends to padding: no empty softmax row


def test_gradients_of_a_packed_row_equal_the_documents_alone():
    net, (tokens, doc_ids) = model(), packed_row()
    used = sum(LENGTHS)
    net(tokens, doc_ids=doc_ids)[:, :used].sum().backward()
    packed = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    net.zero_grad()
    start = 0
    for length in LENGTHS:
        net(tokens[:, start : start + length]).sum().backward()
        start += length
    alone = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    assert packed.keys() == alone.keys()
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], rtol=1e-4, atol=1e-5, msg=name)


def test_not_with_a_kv_cache():
    net, (tokens, doc_ids) = model(), packed_row()
    with pytest.raises(ValueError, match="not with a KV cache"):
        net(tokens, cache=KVCache(net.cfg.n_layers), doc_ids=doc_ids)


def test_training_and_validation_use_the_mask(tmp_path, data_cache):
    """Same seed, same batches: only the mask differs, so the losses do; both train."""
    runs = {
        masking: train(
            tiny_config(tmp_path / str(masking), data_cache, "train.max_steps=3", f"data.document_masking={masking}")
        )
        for masking in (False, True)
    }
    assert runs[True].first_loss != runs[False].first_loss
    assert runs[True].eval["val_loss"] != runs[False].eval["val_loss"]
    assert all(torch.isfinite(torch.tensor(r.losses)).all() for r in runs.values())


@pytest.mark.parametrize("kv_heads,compiled", [(0, False), (2, False), (2, True)])  # 2 of 4 heads: GQA
@torch.no_grad()
def test_flex_block_mask_computes_what_the_dense_mask_does(kv_heads, compiled):
    """model.document_attention=flex (compiled FlexAttention, forward on CPU) gives the logits of
    the dense boolean mask: packed documents, padding, a length that is no multiple of the block;
    also inside blocks compiled as train.compile compiles them."""
    from pretrain.parallel.compile import apply_compile

    nets = {}
    for kind in ("sdpa", "flex"):
        torch.manual_seed(0)
        memory = MemoryConfig(layers=[1], n_keys=8, heads=2, k=4, k_dim=16, kernel="torch")
        cfg = ModelConfig(
            vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=kv_heads, max_seq_len=32, memory=memory
        )
        cfg.document_attention = kind
        nets[kind] = Transformer(cfg).eval()
    if compiled:
        apply_compile(nets["flex"])
    tokens, doc_ids = packed_row()
    tokens, doc_ids = torch.cat([tokens, tokens.flip(1)]), torch.cat([doc_ids, doc_ids.flip(1)])  # B = 2
    dense, flex = (nets[k](tokens, doc_ids=doc_ids) for k in ("sdpa", "flex"))
    torch.testing.assert_close(flex, dense, rtol=1e-5, atol=1e-5)
    assert (flex - nets["flex"](tokens)).abs().max() > 1e-3  # the block mask did mask


def test_flex_training_is_refused_on_cpu_before_anything_runs(tmp_path, data_cache):
    from pretrain.config import ConfigError, check_runtime

    flex = ("data.document_masking=true", "model.document_attention=flex")
    with pytest.raises(ConfigError, match="model.document_attention=flex trains on CUDA only.*use model.document_at"):
        train(tiny_config(tmp_path / "run", data_cache, "train.max_steps=1", *flex))
    assert not (tmp_path / "run").exists()
    check_runtime(tiny_config(tmp_path / "x", data_cache, *flex), device_type="cuda")  # where it trains
    check_runtime(tiny_config(tmp_path / "x", data_cache, "model.document_attention=flex"), device_type="cpu")
