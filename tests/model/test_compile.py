"""torch.compile (inductor, CPU) of the blocks matches eager over 3 training steps, and a
memory block compiles into one graph (fullgraph=True: a graph break would raise)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from pretrain.model.lookups import LookupRecorder
from pretrain.model.objective import language_model_loss
from pretrain.model.transformer import Transformer
from pretrain.parallel.activation_checkpointing import apply_activation_checkpointing
from pretrain.parallel.compile import apply_compile


def _train(model, batches, recorder):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses, grads, slots = [], [], []
    for tokens in batches:
        opt.zero_grad()
        loss = language_model_loss(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        slots.append(recorder.take())
        opt.step()
    return losses, grads, slots


@pytest.mark.slow
def test_compiled_blocks_match_eager_without_graph_breaks(make_model_config):
    torch._dynamo.reset()
    cfg = make_model_config(memory=dict(kernel="torch"), n_layers=2)  # block 1 is a memory block
    torch.manual_seed(0)
    eager = Transformer(cfg)
    compiled = copy.deepcopy(eager)
    counter = CompileCounterWithBackend("inductor")
    apply_compile(compiled, backend=counter, fullgraph=True)
    # checkpointing around the compiled blocks: the recomputation runs the compiled graph again
    apply_activation_checkpointing(compiled, "full")
    batches = torch.randint(0, cfg.vocab_size, (3, 2, 9), generator=torch.Generator().manual_seed(3))
    want = _train(eager, batches, LookupRecorder(eager.memory_layers()))
    got = _train(compiled, batches, LookupRecorder(compiled.memory_layers()))
    for step in range(3):
        torch.testing.assert_close(got[0][step], want[0][step], rtol=1e-5, atol=1e-6)
        assert got[1][step].keys() == want[1][step].keys()
        for name, grad in want[1][step].items():  # dense weights, keys and the value table
            torch.testing.assert_close(got[1][step][name], grad, rtol=1e-5, atol=1e-6, msg=name)
        assert all(torch.equal(a, b) for a, b in zip(got[2][step], want[2][step]))  # same slots, once each
    # each block compiled as one whole graph (fullgraph), the memory lookup inside it
    assert counter.frame_count >= len(compiled.layers)
    ops = {str(node.target) for gm in counter.graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any("memlayers.pkm_topk" in op for op in ops) and any("memlayers.embedding_bag" in op for op in ops)


def test_blocks_compile_once_per_kind_with_the_value_pool_attached(make_model_config):
    """As the trainer builds it (MemoryParallel around the model, then compile): three
    steps of 2 micro-batches with evaluation forwards between them compile the dense
    block and the memory block once per grad mode (a Python-side record of each lookup inside a
    block made dynamo guard on the record's length and recompile the memory block for
    each further lookup of a step, until its recompile limit left it eager for good)."""
    from pretrain.config import OptimConfig
    from pretrain.parallel import MemoryParallel, init_memory_groups

    torch._dynamo.reset()
    cfg = make_model_config(memory=dict(kernel="torch"), n_layers=2)  # block 0 dense, block 1 memory
    torch.manual_seed(0)
    model = Transformer(cfg)
    values = MemoryParallel(model, init_memory_groups(1), OptimConfig(), kernel="torch")
    counter = CompileCounterWithBackend("eager")  # dynamo's guards are what matters here, not codegen
    apply_compile(model, backend=counter)
    data = torch.randint(0, cfg.vocab_size, (3, 2, 2, 9), generator=torch.Generator().manual_seed(3))
    for micro_batches in data:  # 2 micro-batches per step, then 3 evaluation forwards
        values.zero_grad()
        for tokens in micro_batches:
            language_model_loss(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        values.reduce_gradients(), values.clip_grad_norm(1.0), values.step(1.0)
        assert values.accounting()["lookups_last_step"] == 2 * len(model.memory_layers())
        with torch.no_grad():
            for _ in range(3):
                model(micro_batches[0][:, :-1])
    assert counter.frame_count == 4  # 2 block kinds x (training, no_grad evaluation): grad mode is a guard
