"""pretrain.model.names spells memory-layer and value-table names as the module tree does."""

from __future__ import annotations

import pytest
import torch

from pretrain.model import MemoryPlus, Transformer
from pretrain.model.names import memory_layer_name, slot_stream_names, value_table_name


@pytest.mark.parametrize("layers, shared", [([1], True), ([0, 2], True), ([0, 2], False), ([2, 0], False), ([], True)])
def test_names_and_table_count_match_the_built_model(make_model_config, layers, shared):
    cfg = make_model_config(memory=dict(layers=layers, shared_values=shared), n_layers=3)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert cfg.memory.num_value_tables == len(model.values)
    for i in layers:
        assert isinstance(model.get_submodule(memory_layer_name(i)).ffn, MemoryPlus)
    # memory_layers() (whose lookups the slot counters receive) runs in block order
    assert [m for m in model.memory_layers()] == [model.get_submodule(memory_layer_name(i)).ffn for i in sorted(layers)]
    state = model.state_dict()
    value_weights = {k for k in state if k.startswith("values.")}
    assert value_weights == {f"{value_table_name(t)}.weight" for t in range(len(model.values))}
    # A stream per memory layer (by its module path), plus the joined stream of a shared table.
    streams = slot_stream_names(cfg.memory)
    memory_paths = [name for name, module in model.named_modules() if isinstance(module, MemoryPlus)]
    assert [f"{s}.ffn" for s in streams[: len(layers)]] == memory_paths
    assert streams[len(layers) :] == ([value_table_name(0)] if shared and len(layers) > 1 else [])
