"""Background sample: raw slot indices (+ doc ids) of a few micro-batches, kept by
reservoir sampling over the whole run, so that document frequencies at any unit —
including the paper's batch level — can be recomputed after training.

The choice of which micro-batches to keep depends only on (seed, micro-batch index),
not on the data and not on a stateful RNG: every rank keeps the same micro-batch
indices (together they form global batches) and a resumed run makes the same choices.
Slots are stored as int32, doc ids as int64, on `device` (default CPU: the sample can
be large; copies from an accelerator are non-blocking into pinned memory, and every CPU read or
write of the buffers first waits for the copies in flight).
Entries have the shape of the largest micro-batch sampled; a smaller one (train.micro_batch
lowered on resume) is padded with rows of doc id -1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.slots.granularity import parse_granularity, unit_ids

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def reservoir_slot(seed: int, item: int, capacity: int) -> int:
    """Algorithm R: the reservoir position item `item` (0-based) goes to, or -1 if dropped."""
    if item < capacity:
        return item
    j = _splitmix64((seed * 0x100000001B3) ^ item) % (item + 1)
    return j if j < capacity else -1


@dataclass
class SampleData:
    """A (possibly multi-rank) background sample, as saved and loaded.

    indices[layer]: (M, B*S, H, k) int32; doc_ids: (M, B, S) int64 (negative = padding);
    batch_index: (M,) int64, the micro-batch index each entry came from (entries from
    different ranks with the same index belong to the same global batch).
    """

    indices: dict[str, torch.Tensor]
    doc_ids: torch.Tensor
    batch_index: torch.Tensor


class BackgroundSample:
    def __init__(self, capacity: int, layer_names: list[str], seed: int = 0, device="cpu"):
        if capacity < 0:
            raise ValueError(f"sample_batches={capacity} must be >= 0 (config key slots.sample_batches)")
        self.capacity, self.layer_names, self.seed = capacity, list(layer_names), seed
        self.device = torch.device(device)
        self.indices: dict[str, torch.Tensor] = {}
        self.doc_ids: torch.Tensor | None = None
        self.batch_index = torch.full((capacity,), -1, dtype=torch.int64)
        self._replaced: dict[int, tuple] | None = None  # this step's entries before it, once begin_step ran
        self._copies: torch.cuda.Event | None = None  # recorded after the last non-blocking copies

    def _wait_for_copies(self) -> None:
        """Let the non-blocking copies into the pinned buffers land before the CPU reads or writes them:
        a clone would read a half-copied entry, and a write (a skipped step's undo) would be overwritten
        by a copy landing after it."""
        if self._copies is not None:
            self._copies.synchronize()
            self._copies = None

    def begin_step(self) -> None:
        """Start recording what this step's offers replace, for `discard_step`."""
        self._replaced = {}

    def discard_step(self) -> None:
        """Put back every entry this step's offers replaced (a replaced entry that was empty is
        empty again): a skipped step leaves the sample as it was before the step."""
        self._wait_for_copies()
        for j, (batch_index, indices, doc_ids) in (self._replaced or {}).items():
            self.batch_index[j] = batch_index
            if batch_index < 0:
                continue
            for name, old in indices.items():  # the entry may have grown since: pad as _grow does
                self.indices[name][j, : old.shape[0]].copy_(old)
                self.indices[name][j, old.shape[0] :].zero_()
            self.doc_ids[j, : doc_ids.shape[0]].copy_(doc_ids)
            self.doc_ids[j, doc_ids.shape[0] :].fill_(-1)
        self._replaced = {}

    def offer(self, item: int, layer_indices: list[torch.Tensor], doc_ids: torch.Tensor) -> None:
        j = reservoir_slot(self.seed, item, self.capacity)
        if j < 0:
            return
        if self.doc_ids is None:
            self._allocate(layer_indices, doc_ids)
        rows, seq_len = doc_ids.shape
        if seq_len != self.doc_ids.shape[2]:
            raise ValueError(
                f"background sample: micro-batch doc_ids shape {tuple(doc_ids.shape)} differs from the first "
                f"sampled one {tuple(self.doc_ids.shape[1:])} in its sequence length; keep data.seq_len fixed "
                f"or set slots.sample_batches=0"
            )
        if rows > self.doc_ids.shape[1]:
            self._grow(rows)
        if self._replaced is not None and j not in self._replaced:
            self._wait_for_copies()  # a copy into entry j from an earlier step may be in flight
            old = int(self.batch_index[j])
            keep = old >= 0  # an empty entry's contents are never read
            self._replaced[j] = (
                old,
                {n: t[j].clone() for n, t in self.indices.items()} if keep else {},
                self.doc_ids[j].clone() if keep else None,
            )
        # a smaller micro-batch (train.micro_batch changed on resume) fills the entry's first rows; the
        # rest are padding (doc id -1), which every reader of the sample leaves out
        blocking = not self.doc_ids.is_pinned()
        for name, idx in zip(self.layer_names, layer_indices):
            self.indices[name][j, : rows * seq_len].copy_(idx.to(torch.int32), non_blocking=not blocking)
            self.indices[name][j, rows * seq_len :].zero_()
        self.doc_ids[j, :rows].copy_(doc_ids, non_blocking=not blocking)
        self.doc_ids[j, rows:].fill_(-1)
        self.batch_index[j] = item
        if not blocking and doc_ids.is_cuda:
            self._copies = torch.cuda.Event()
            self._copies.record()

    def _grow(self, rows: int) -> None:
        """Room for micro-batches of `rows` rows: the entries kept so far get padding rows."""
        self._wait_for_copies()  # copies into the old buffers may be in flight
        old_rows, seq_len = self.doc_ids.shape[1:]

        def grown(old, shape, fill):
            t = torch.full((self.capacity, *shape), fill, dtype=old.dtype, device=old.device)
            t = t.pin_memory() if old.is_pinned() else t
            t[:, : old.shape[1]].copy_(old)
            return t

        self.indices = {n: grown(t, (rows * seq_len, *t.shape[2:]), 0) for n, t in self.indices.items()}
        self.doc_ids = grown(self.doc_ids, (rows, seq_len), -1)

    def _allocate(self, layer_indices, doc_ids) -> None:
        pin = self.device.type == "cpu" and doc_ids.is_cuda

        def buf(shape, dtype):
            t = torch.zeros((self.capacity, *shape), dtype=dtype, device=self.device)
            return t.pin_memory() if pin else t

        for name, idx in zip(self.layer_names, layer_indices):
            self.indices[name] = buf(idx.shape, torch.int32)
        self.doc_ids = buf(doc_ids.shape, torch.int64)

    def data(self) -> SampleData | None:
        """The filled entries (None when nothing was sampled)."""
        if self.doc_ids is None:
            return None
        self._wait_for_copies()
        filled = self.batch_index >= 0
        return SampleData(
            {n: t[filled].clone() for n, t in self.indices.items()},
            self.doc_ids[filled].clone(),
            self.batch_index[filled].clone(),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.doc_ids is None:
            return {"sample.batch_index": self.batch_index.clone()}
        self._wait_for_copies()
        sd = {f"sample.{n}.indices": t.clone() for n, t in self.indices.items()}
        sd["sample.doc_ids"] = self.doc_ids.clone()
        sd["sample.batch_index"] = self.batch_index.clone()
        return sd

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        bi = sd["sample.batch_index"]
        if bi.shape != (self.capacity,):
            raise ValueError(
                f"checkpointed background sample holds {bi.shape[0]} batches but slots.sample_batches="
                f"{self.capacity}; resume with the same slots.sample_batches"
            )
        self.batch_index = bi.clone().to(torch.int64)
        if "sample.doc_ids" in sd:
            self.indices = {n: sd[f"sample.{n}.indices"].to(self.device, torch.int32).clone() for n in self.layer_names}
            self.doc_ids = sd["sample.doc_ids"].to(self.device, torch.int64).clone()


def recompute_doc_freq(sample: SampleData, layer: str, granularity: str, num_slots: int):
    """Document frequencies from a background sample: (df int64 (num_slots,), num_units).

    granularity: 'batch' (one unit per micro-batch index, merging ranks), 'document'
    (distinct doc ids within the sample), 'sequence' or 'chunk:<n>'. Padding (doc id < 0)
    is excluded.
    """
    idx = sample.indices[layer].to(torch.int64)  # (M, T, H, k)
    docs = sample.doc_ids.to(torch.int64)  # (M, B, S)
    M, B, S = docs.shape
    T = B * S
    valid = docs.reshape(M, T) >= 0
    if granularity == "batch":
        _, unit = torch.unique(sample.batch_index, return_inverse=True)
        unit = unit[:, None].expand(M, T)
    elif granularity == "document":
        _, unit = torch.unique(docs.reshape(M, T), return_inverse=True)
    else:
        g = parse_granularity(granularity)
        per_mb = unit_ids(g, docs[0]).max() + 1
        unit = torch.stack([unit_ids(g, docs[m]) + m * per_mb for m in range(M)])
    unit = unit.reshape(M, T)[valid]
    slots = idx.reshape(M, T, -1)[valid]  # (V, H*k)
    keys = torch.unique(unit[:, None] * num_slots + slots)
    df = torch.bincount(keys % num_slots, minlength=num_slots)
    return df, int(torch.unique(unit).numel())
