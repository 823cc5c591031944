"""Sparse memory finetuning changes exactly the TF-IDF-selected value rows, by exactly SGD."""

import copy
import dataclasses
import math

import pytest
import torch

from pretrain.data import Tokenizer
from pretrain.export import load
from pretrain.model import language_model_loss
from pretrain.slots import TableMismatchError, load_table
from pretrain.smf import FinetuneSet, SlotSelector, SparseMemoryFinetuning


@pytest.fixture
def setup(smf_export):
    export, dataset = smf_export
    model = load(export)
    data = FinetuneSet([dataset / "new_facts.jsonl"], Tokenizer(export / "tokenizer.model"), model.cfg.max_seq_len)
    return model, load_table(export), next(data.batches(4))


def brute_force_top(counts, doc_freq, num_documents, t):
    """Independent TF-IDF ranking in plain Python floats (the paper's formula), of the slots
    scoring above 0."""
    total = sum(counts)
    scored = [
        (c / total * math.log((num_documents + 1) / (d + 1)), -slot)
        for slot, (c, d) in enumerate(zip(counts, doc_freq))
        if c > 0 and d < num_documents  # a slot in every background unit: idf 0, no signal
    ]
    return sorted(-s for _, s in sorted(scored, reverse=True)[:t])


def test_update_changes_exactly_the_selected_rows_bitwise(setup):
    model, table, batch = setup
    before = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model)  # the expected update, computed from a full dense gradient
    lr, top_t = 0.5, 7
    method = SparseMemoryFinetuning(model, table, top_t=top_t, lr=lr)
    method.step(batch)

    (rows,) = method.last_rows.values()
    assert 0 < rows.numel() <= top_t
    # the selected rows are the brute-force TF-IDF top-t of the batch's accesses at non-padding positions
    layer = reference.memory_layers()[0]
    loss = language_model_loss(reference(batch.tokens), batch.targets)
    flat = layer.last_indices.reshape(batch.keep.numel(), -1)[batch.keep.reshape(-1)]
    counts = torch.bincount(flat.reshape(-1), minlength=table.num_slots).tolist()
    name = table.layers[0]
    assert rows.tolist() == brute_force_top(counts, table.doc_freq[name].tolist(), table.num_documents, top_t)

    grad = torch.autograd.grad(loss, reference.values[0].weight)[0]
    after = model.state_dict()
    for key, value in before.items():
        if key != "values.0.weight":
            assert torch.equal(after[key], value), f"{key} changed"
    untouched = torch.ones(table.num_slots, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(after["values.0.weight"][untouched], value_rows := before["values.0.weight"][untouched])
    assert value_rows.numel() > 0
    expected = before["values.0.weight"][rows] - lr * grad[rows]
    torch.testing.assert_close(after["values.0.weight"][rows], expected, rtol=0, atol=1e-6)
    assert not torch.equal(after["values.0.weight"][rows], before["values.0.weight"][rows])


def test_selection_follows_the_exported_table(setup):
    """With a uniform table (every df equal) TF-IDF ranks by batch counts alone: a different selection."""
    model, table, batch = setup
    name = table.layers[0]
    uniform = dataclasses.replace(table, doc_freq={name: torch.full_like(table.doc_freq[name], 5)})
    model(batch.tokens)
    real = SlotSelector(model, table, top_t=20).select(batch.keep)[0]
    flat = SlotSelector(model, uniform, top_t=20).select(batch.keep)[0]
    assert not torch.equal(real, flat)
    counts = torch.bincount(
        model.memory_layers()[0].last_indices.reshape(batch.keep.numel(), -1)[batch.keep.reshape(-1)].reshape(-1),
        minlength=table.num_slots,
    )
    by_count = torch.argsort(counts, descending=True, stable=True)[:20]
    assert torch.equal(flat, torch.sort(by_count).values)


def test_only_kept_positions_count(setup):
    """With every position but three masked out, all-slots selection is exactly what those three read."""
    model, table, batch = setup
    model(batch.tokens)
    keep = torch.zeros_like(batch.keep)
    keep[0, :3] = True
    rows = SlotSelector(model, table, top_t=10**6).select(keep)[0]
    seq = batch.tokens.shape[1]
    read = model.memory_layers()[0].last_indices[:3]  # positions 0..2 of row 0 (flattened B*S order)
    assert seq > 3
    assert rows.tolist() == sorted(set(read.reshape(-1).tolist()))


def test_a_table_of_another_model_is_refused(setup):
    model, table, _ = setup
    wrong = dataclasses.replace(table, num_slots=table.num_slots * 4)
    with pytest.raises(TableMismatchError, match="slots"):
        SlotSelector(model, wrong, top_t=5)
    with pytest.raises(ValueError, match="top_t"):
        SlotSelector(model, table, top_t=0)


def test_clipping_scales_the_update_to_the_norm_bound(setup):
    model, table, batch = setup
    start = model.values[0].weight.detach().clone()
    free = SparseMemoryFinetuning(copy.deepcopy(model), table, top_t=9, lr=2.0)
    free.step(batch)
    bound = free.last_grad_norm / 4
    clipped = SparseMemoryFinetuning(model, table, top_t=9, lr=2.0, max_grad_norm=bound)
    clipped.step(batch)
    assert clipped.last_grad_norm == pytest.approx(free.last_grad_norm, rel=1e-6)
    free_delta = free.model.values[0].weight.detach() - start
    clipped_delta = model.values[0].weight.detach() - start
    torch.testing.assert_close(clipped_delta, free_delta / 4, rtol=1e-4, atol=1e-7)
    # the applied gradient's norm is the bound: |delta| / lr
    assert (clipped_delta.norm() / 2.0).item() == pytest.approx(bound, rel=1e-4)
    with pytest.raises(ValueError, match="max_grad_norm"):
        SparseMemoryFinetuning(model, table, top_t=9, lr=2.0, max_grad_norm=-1)


@pytest.mark.parametrize("shared", [True, False])
def test_several_memory_layers_in_float64(make_model_config, shared):
    """Two memory layers, one shared or two separate tables: the rows' gradient assembled from
    dL/dbag equals float64 autograd's, and each table's selection is its layers' union."""
    from pretrain.model import Transformer
    from pretrain.slots import SlotTable
    from pretrain.smf import FinetuneBatch

    torch.manual_seed(0)
    cfg = make_model_config(memory=dict(layers=[0, 1], n_keys=6, k=3, shared_values=shared, kernel="torch"))
    model = Transformer(cfg).double()
    n = cfg.memory.num_slots
    gen = torch.Generator().manual_seed(1)
    doc_freq = {f"layers.{i}": torch.randint(0, 50, (n,), generator=gen) for i in (0, 1)}
    table = SlotTable(
        path="synthetic",
        layers=list(doc_freq),
        num_slots=n,
        counts=dict(doc_freq),
        doc_freq=doc_freq,
        num_documents=60,
        num_tokens=1000,
        granularity="document",
        step=1,
        metadata={},
    )
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=gen)
    batch = FinetuneBatch(tokens[:, :-1], tokens[:, 1:], torch.ones(2, 8, dtype=torch.bool))
    reference = copy.deepcopy(model)
    loss = language_model_loss(reference(batch.tokens), batch.targets)
    grads = torch.autograd.grad(loss, [t.weight for t in reference.values])

    method = SparseMemoryFinetuning(model, table, top_t=5, lr=1.0)
    method.step(batch)
    assert sorted(method.last_rows) == ([0] if shared else [0, 1])
    for i, layer in enumerate(reference.memory_layers()):
        counts = torch.bincount(layer.last_indices.reshape(-1), minlength=n).tolist()
        want = set(brute_force_top(counts, doc_freq[f"layers.{i}"].tolist(), 60, 5))
        assert want <= set(method.last_rows[0 if shared else i].tolist())
    for t, rows in method.last_rows.items():
        expected = reference.values[t].weight.detach().clone()
        expected[rows] -= grads[t][rows]
        torch.testing.assert_close(model.values[t].weight, expected, rtol=0, atol=1e-12)


def test_a_slot_read_in_every_background_unit_is_never_updated(setup):
    """A slot with df = |B| has idf 0 (TF-IDF 0: nothing marks it as the batch's); with top_t above
    the number of slots that score, it was chosen anyway and its row updated. Now the selection
    is every read slot but those."""
    model, table, batch = setup
    name = table.layers[0]
    model(batch.tokens)
    keep = torch.zeros_like(batch.keep)
    keep[0, :3] = True
    read = sorted(set(model.memory_layers()[0].last_indices[:3].reshape(-1).tolist()))
    doc_freq = table.doc_freq[name].clone()
    doc_freq[read[::2]] = table.num_documents  # every other read slot is in every unit
    everywhere = dataclasses.replace(table, doc_freq={name: doc_freq})
    rows = SlotSelector(model, everywhere, top_t=10**6).select(keep)[0]
    assert rows.tolist() == read[1::2] and len(read) > 1


def test_a_step_with_no_slot_of_signal_changes_no_row(setup):
    """Every slot in every background unit: no slot scores above 0, the step selects none and every
    value row stays bitwise as it was (the step runs, with a gradient norm of 0)."""
    model, table, batch = setup
    name = table.layers[0]
    flat = dataclasses.replace(table, doc_freq={name: torch.full_like(table.doc_freq[name], table.num_documents)})
    before = copy.deepcopy(model.state_dict())
    method = SparseMemoryFinetuning(model, flat, top_t=50, lr=0.5)
    method.step(batch)
    assert method.rows_updated == 0 and method.last_grad_norm == 0.0
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
