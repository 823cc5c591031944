"""Names of memory layers and value tables, spelled as the model's module tree spells them.

Slot statistics streams, slot-table keys, value-shard files and exported weights all key
on these names; this module is the one place that spells them.
"""

from __future__ import annotations

from pretrain.model.config import MemoryConfig

VALUE_TABLES = "values"  # Transformer.values, the nn.ModuleList of value tables


def memory_layer_name(block: int) -> str:
    """'layers.<block>': the transformer block whose FFN is the memory layer."""
    return f"layers.{block}"


def value_table_name(table: int) -> str:
    """'values.<table>': one value table (its weight is '<name>.weight' in a state dict)."""
    return f"{VALUE_TABLES}.{table}"


def slot_stream_names(memory: MemoryConfig) -> list[str]:
    """The slot-access counters: one per memory layer, plus one for a value table that
    several layers share (its accesses are the layers' accesses joined). In block order, the
    order of `Transformer.memory_layers()` whose lookups the counters receive, whatever the
    order of `memory.layers`."""
    names = [memory_layer_name(i) for i in sorted(memory.layers)]
    return names + ([value_table_name(0)] if memory.shared_values and len(memory.layers) > 1 else [])
