"""LookupRecorder: receives the slots each memory layer reads, through the explicit hand-over.

The trainer registers one recorder on the model's memory layers
(`MemoryPlus.register_lookup_hook`) and, after each training micro-batch's forward and
backward, takes exactly one (B*S, heads, k) index tensor per layer. Lookups are recorded
in training mode only (evaluation forwards read slots too, but are not training
accesses), and never during an activation checkpoint's recomputation (the layer does
not call its hooks then). `take()` refuses a micro-batch in which a layer handed over
anything but one lookup, so a double count cannot pass silently.
"""

from __future__ import annotations

import torch


class LookupRecorder:
    """Slot indices of the last training forward, one tensor per memory layer."""

    def __init__(self, memory_layers):
        self.layers = list(memory_layers)
        self._pending: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._handles = [layer.register_lookup_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, position: int):
        def record(layer, indices: torch.Tensor, weights: torch.Tensor) -> None:
            if layer.training:
                self._pending[position].append(indices)

        return record

    def take(self, with_shared_table: bool = False) -> list[torch.Tensor]:
        """Per-layer indices of the forward since the last take (and all layers joined, for
        a value table shared by several layers); clears the record (also when it raises)."""
        counts = [len(p) for p in self._pending]
        pending, self._pending = self._pending, [[] for _ in self.layers]
        if any(c != 1 for c in counts):
            raise RuntimeError(
                f"memory layers handed over {counts} lookups since the last take; expected one "
                "each (a forward without take, or a lookup recorded twice)"
            )
        per_layer = [p[0] for p in pending]
        return per_layer + ([torch.cat(per_layer, dim=1)] if with_shared_table else [])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
