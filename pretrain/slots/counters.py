"""Slot access counters for memory layers: counts, document frequencies, reduction.

Per memory layer (or per shared value table: pass the concatenation of its layers'
indices along the heads dimension under its own name) this keeps, on the device:
  counts[i]    top-k hits of slot i, over tokens, heads and k;
  doc_freq[i]  number of units (documents, sequences or chunks; see granularity.py for
               why the unit matters) in which slot i was selected at least once;
  num_documents, num_tokens  units and (non-padding) tokens seen.
`update` uses only fixed-shape device ops (sort, index_add, scatter): no host sync.

Unique (unit, slot) pairs of a micro-batch come from sorting unit * N + slot. Documents
need more care because one document can straddle rows, micro-batches and steps:
  * within a micro-batch, rows are taken as consecutive pieces of the rank's stream
    (row-major), so a document is one run of equal doc ids in the flattened batch;
  * across micro-batches, each layer keeps `last_doc[s]`: the doc id that last selected
    slot s. Documents are contiguous in a stream, so a continuing document D has
    selected s before iff last_doc[s] == D (no other document can have come between).
    A pair counts iff that test fails. A run starts a new document unless its id is the
    one that ended the stream's previous micro-batch.
  * `streams` > 1 handles micro-batches that alternate between several contiguous
    streams (DataLoader workers deliver batches round-robin): micro-batch t belongs to
    stream t % streams, each with its own last_doc table (streams x N int64 per layer).
Counted exactly: a document split over rows, micro-batches, steps, checkpoints (state
is saved) and interleaved worker streams. Not merged: one document whose pieces are read
by two different streams or ranks (at a shard boundary) counts once per stream that saw
it; shuffling sequences (data.shuffle_buffer > 0) breaks contiguity the same way.
Padding: doc ids < 0 are excluded everywhere.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from pretrain.slots.granularity import parse_granularity, unit_ids
from pretrain.slots.sample import BackgroundSample, SampleData
from pretrain.slots.summary import distribution_summary

STATE_FORMAT = "slot_statistics/1"


class SlotStatistics:
    def __init__(
        self,
        num_slots: int,
        layer_names: list[str],
        granularity: str = "document",
        device="cpu",
        sample_batches: int = 0,
        seed: int = 0,
        streams: int = 1,
        sample_device="cpu",
    ):
        if num_slots <= 0 or not layer_names:
            raise ValueError(
                f"SlotStatistics needs num_slots > 0 and at least one layer name "
                f"(got num_slots={num_slots}, layer_names={layer_names})"
            )
        if len(set(layer_names)) != len(layer_names):
            raise ValueError(f"layer_names {layer_names} lists a layer twice")
        if streams <= 0:
            raise ValueError(f"streams={streams} must be >= 1 (number of data loader workers, or 1)")
        self.num_slots, self.layer_names = num_slots, list(layer_names)
        self.granularity = parse_granularity(granularity)
        self.device, self.streams, self.seed = torch.device(device), streams, seed
        z = lambda *shape, fill=0: torch.full(shape, fill, dtype=torch.int64, device=self.device)  # noqa: E731
        self.counts = {n: z(num_slots) for n in self.layer_names}
        self.doc_freq = {n: z(num_slots) for n in self.layer_names}
        self.interval_start = {n: z(num_slots) for n in self.layer_names}
        self.totals = z(2)  # [num_documents, num_tokens]
        self.interval_start_totals = z(2)
        is_doc = self.granularity.kind == "document"
        self.last_doc = {n: z(streams, num_slots + 1, fill=-1) for n in self.layer_names} if is_doc else {}
        self.stream_tail = z(streams, fill=-1)  # doc id at the end of each stream's last micro-batch
        self.micro_batches, self.step = 0, 0
        self.history: dict[str, list[int]] = {
            "step": [],
            **{f"{n}.used": [] for n in self.layer_names},
            **{f"{n}.interval_used": [] for n in self.layer_names},
        }
        self.sample = (
            BackgroundSample(sample_batches, self.layer_names, seed, sample_device) if sample_batches else None
        )
        self.reduced = False
        self._reduced_sample: SampleData | None = None

    # ---- counting -------------------------------------------------------------------
    def update(self, layer_indices: list[torch.Tensor], doc_ids: torch.Tensor, count_this_rank: bool = True) -> None:
        """Count one micro-batch: layer_indices[l] (B*S, H, k) slot ids, doc_ids (B, S)."""
        if self.reduced:
            raise RuntimeError("this SlotStatistics is a reduced copy (from reduce()); update the original")
        if len(layer_indices) != len(self.layer_names):
            raise ValueError(
                f"got indices for {len(layer_indices)} layers, expected {len(self.layer_names)} ({self.layer_names})"
            )
        if doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be (batch, seq_len), got shape {tuple(doc_ids.shape)}")
        B, S = doc_ids.shape
        for name, idx in zip(self.layer_names, layer_indices):
            if idx.dim() != 3 or idx.shape[0] != B * S:
                raise ValueError(
                    f"indices of {name} have shape {tuple(idx.shape)}; expected ({B * S}, heads, k) "
                    f"for doc_ids of shape {(B, S)}"
                )
        item = self.micro_batches
        self.micro_batches += 1
        if not count_this_rank:
            return
        stream = item % self.streams
        T = B * S
        flat = doc_ids.reshape(T).to(self.device, torch.int64)
        valid = flat >= 0
        unit = unit_ids(self.granularity, flat.view(B, S))
        self.totals[1] += valid.sum()
        if self.granularity.kind == "document":
            starts = unit == torch.arange(T, device=self.device)
            self.totals[0] += (starts & valid & (flat != self.stream_tail[stream])).sum()
        else:
            occupied = torch.zeros(self._units_per_batch(B, S), dtype=torch.int64, device=self.device)
            occupied.scatter_reduce_(0, unit, valid.long(), "amax")
            self.totals[0] += occupied.sum()
        for name, idx in zip(self.layer_names, layer_indices):
            self._update_layer(name, idx.to(self.device), unit, flat, valid, stream)
        if self.granularity.kind == "document":
            self.stream_tail[stream] = flat[-1]
        if self.sample is not None:
            self.sample.offer(item, layer_indices, doc_ids)

    def _units_per_batch(self, B: int, S: int) -> int:
        g = self.granularity
        return B if g.kind == "sequence" else B * -(-S // g.chunk)

    def _update_layer(self, name, idx, unit, flat, valid, stream) -> None:
        N, T = self.num_slots, flat.numel()
        key_dtype = torch.int32 if N * T <= 2**31 else torch.int64
        # slot-major keys: each slot's pairs are contiguous, its latest unit last; padding
        # gets key -1 and sorts first
        keys = idx.reshape(T, -1).to(key_dtype) * T + unit.to(key_dtype)[:, None]
        keys = torch.where(valid[:, None], keys, torch.full_like(keys, -1)).reshape(-1)
        s = keys.sort().values
        ok = s >= 0
        first = ok.clone()
        first[1:] &= s[1:] != s[:-1]
        slot_of = torch.where(ok, s // T, N).long()  # padding -> N, a dummy slot
        self.counts[name].index_add_(0, slot_of.clamp(max=N - 1), ok.long())
        if self.granularity.kind != "document":
            self.doc_freq[name].index_add_(0, slot_of.clamp(max=N - 1), first.long())
            return
        doc_of = flat[(s % T).long()]
        last = self.last_doc[name][stream]  # (N + 1,): column N absorbs writes that must not land
        new = first & (last[slot_of] != doc_of)
        self.doc_freq[name].index_add_(0, slot_of.clamp(max=N - 1), new.long())
        is_last = ok.clone()
        is_last[:-1] &= slot_of[1:] != slot_of[:-1]
        last.scatter_(0, torch.where(is_last, slot_of, N), doc_of)

    def end_step(self, step: int) -> None:
        """Mark an optimizer-step boundary; `step` is recorded in history and tables."""
        self.step = int(step)

    @property
    def num_documents(self) -> int:
        return int(self.totals[0].item())

    @property
    def num_tokens(self) -> int:
        return int(self.totals[1].item())

    # ---- reduction --------------------------------------------------------------------
    def reduce(self, group=None, close_interval: bool = True) -> "SlotStatistics":
        """A copy with counts, doc freqs and totals summed over the ranks of `group`.

        Collective: every rank of the group must call it. With close_interval, the
        interval (for `summary`) ends here on every rank and a coverage point
        (step, slots used so far, slots used in the interval) is appended to history.
        The background samples of all ranks are gathered into the copy.
        """
        out = self._copy()
        world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            for n in self.layer_names:
                buf = torch.cat([out.counts[n], out.doc_freq[n], out.interval_start[n]])
                dist.all_reduce(buf, group=group)
                out.counts[n], out.doc_freq[n], out.interval_start[n] = buf.split(self.num_slots)
            buf = torch.cat([out.totals, out.interval_start_totals])
            dist.all_reduce(buf, group=group)
            out.totals, out.interval_start_totals = buf[:2].clone(), buf[2:].clone()
        out._reduced_sample = self._gather_sample(group, world)
        if close_interval:
            self.history["step"].append(self.step)
            for n in self.layer_names:
                self.history[f"{n}.used"].append(int((out.counts[n] > 0).sum().item()))
                interval = out.counts[n] - out.interval_start[n]
                self.history[f"{n}.interval_used"].append(int((interval > 0).sum().item()))
                self.interval_start[n] = self.counts[n].clone()
            self.interval_start_totals = self.totals.clone()
            out.history = copy.deepcopy(self.history)
        return out

    def _gather_sample(self, group, world: int) -> SampleData | None:
        local = self.sample.data() if self.sample is not None else None
        if world == 1:
            return local
        parts: list = [None] * world
        dist.all_gather_object(parts, local, group=group)
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        return SampleData(
            {n: torch.cat([p.indices[n] for p in parts]) for n in self.layer_names},
            torch.cat([p.doc_ids for p in parts]),
            torch.cat([p.batch_index for p in parts]),
        )

    def _copy(self) -> "SlotStatistics":
        out = object.__new__(SlotStatistics)
        out.__dict__.update(
            {
                k: v
                for k, v in self.__dict__.items()
                if k not in ("counts", "doc_freq", "interval_start", "last_doc", "sample")
            }
        )
        out.counts = {n: t.clone() for n, t in self.counts.items()}
        out.doc_freq = {n: t.clone() for n, t in self.doc_freq.items()}
        out.interval_start = {n: t.clone() for n, t in self.interval_start.items()}
        out.totals, out.interval_start_totals = self.totals.clone(), self.interval_start_totals.clone()
        out.stream_tail, out.last_doc, out.sample = self.stream_tail.clone(), {}, None
        out.history = copy.deepcopy(self.history)
        out.reduced = True
        return out

    def sample_data(self) -> SampleData | None:
        """The background sample: gathered over ranks in a reduced copy, else this rank's."""
        if self.reduced:
            return self._reduced_sample
        return self.sample.data() if self.sample is not None else None

    # ---- logging ------------------------------------------------------------------------
    def summary(self, interval: bool = True) -> dict[str, float]:
        """TensorBoard scalars per layer: cumulative, and (interval=True) since the last interval end."""
        out = {"slots/num_documents": float(self.num_documents), "slots/num_tokens": float(self.num_tokens)}
        for n in self.layer_names:
            for k, v in distribution_summary(self.counts[n]).items():
                out[f"slots/{n}/{k}"] = v
            if interval:
                for k, v in distribution_summary(self.counts[n] - self.interval_start[n]).items():
                    out[f"slots/{n}/interval/{k}"] = v
        return out

    def histograms(self) -> dict[str, torch.Tensor]:
        """log10(1 + count) per slot, cumulative and over the current interval (CPU float32)."""
        out = {}
        for n in self.layer_names:
            out[f"slots/{n}/log10_count"] = torch.log10(1 + self.counts[n].double()).float().cpu()
            interval = self.counts[n] - self.interval_start[n]
            out[f"slots/{n}/interval/log10_count"] = torch.log10(1 + interval.double()).float().cpu()
        return out

    # ---- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's state (tensors on CPU + a small 'meta' dict): save one per rank."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # sample copies are non-blocking
        sd = {
            "totals": self.totals.cpu().clone(),
            "interval_totals": self.interval_start_totals.cpu().clone(),
            "stream_tail": self.stream_tail.cpu().clone(),
        }
        for n in self.layer_names:
            sd[f"{n}.counts"] = self.counts[n].cpu().clone()
            sd[f"{n}.doc_freq"] = self.doc_freq[n].cpu().clone()
            sd[f"{n}.interval_start"] = self.interval_start[n].cpu().clone()
            if n in self.last_doc:
                sd[f"{n}.last_doc"] = self.last_doc[n].cpu().clone()
        sample = self.sample_data() if self.reduced else None
        if sample is not None:
            sd.update({f"sample.{n}.indices": t for n, t in sample.indices.items()})
            sd["sample.doc_ids"], sd["sample.batch_index"] = sample.doc_ids, sample.batch_index
        elif self.sample is not None:
            sd.update(self.sample.state_dict())
        sd["meta"] = {
            "format": STATE_FORMAT,
            "num_slots": self.num_slots,
            "layer_names": list(self.layer_names),
            "granularity": self.granularity.name,
            "streams": self.streams,
            "micro_batches": self.micro_batches,
            "step": self.step,
            "seed": self.seed,
            "reduced": self.reduced,
            "sample_batches": self.sample.capacity if self.sample is not None else 0,
            "history": copy.deepcopy(self.history),
        }
        return sd

    def _check_state(self, sd: dict, same_streams: bool = True) -> dict:
        meta = sd.get("meta", {})
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"slot statistics state has format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        mine = {
            "num_slots": self.num_slots,
            "layer_names": self.layer_names,
            "granularity": self.granularity.name,
            "sample_batches": self.sample.capacity if self.sample else 0,
        }
        if same_streams:
            mine["streams"] = self.streams
        for key, value in mine.items():
            if meta[key] != value:
                raise ValueError(
                    f"checkpointed slot statistics have {key}={meta[key]!r} but this run has {value!r}; resume "
                    f"with the same model.memory / slots config (or start the statistics afresh)"
                )
        if meta.get("reduced"):
            raise ValueError("cannot resume counting from a reduced copy: load the per-rank state_dict()")
        return meta

    def load_resharded(self, states: list[dict]) -> str:
        """Continue from the per-rank states of a run with another number of ranks (all of them,
        in rank order). Rank 0 takes their sums (counts, document frequencies, totals, interval
        starts) and every other rank starts from zero, so the reduced table, the sum over ranks,
        is exactly the saved one. Open documents are forgotten (`last_doc`): a document being
        read at the reshard counts once more in `doc_freq` where its rest is read (at most one
        per old reader, as at a shard boundary). Rank r keeps old rank r's background sample."""
        metas = [self._check_state(sd, same_streams=False) for sd in states]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        z = lambda t: torch.zeros_like(t, device=self.device)  # noqa: E731
        total = lambda key: sum(sd[key].to(self.device) for sd in states)  # noqa: E731
        take = total if rank == 0 else (lambda key: z(states[0][key]))
        self.totals, self.interval_start_totals = take("totals"), take("interval_totals")
        for n in self.layer_names:
            self.counts[n], self.doc_freq[n] = take(f"{n}.counts"), take(f"{n}.doc_freq")
            self.interval_start[n] = take(f"{n}.interval_start")
            if n in self.last_doc:
                self.last_doc[n].fill_(-1)
        self.stream_tail.fill_(-1)
        self.micro_batches, self.step = int(metas[0]["micro_batches"]), int(metas[0]["step"])
        self.history = copy.deepcopy(metas[0]["history"])
        if self.sample is not None and rank < len(states):
            self.sample.load_state_dict(states[rank])
        return "slot counters summed into rank 0" if len(states) > 1 else "slot counters kept on rank 0"

    def load_state_dict(self, sd: dict) -> None:
        meta = self._check_state(sd)
        dev = self.device
        self.totals = sd["totals"].to(dev).clone()
        self.interval_start_totals = sd["interval_totals"].to(dev).clone()
        self.stream_tail = sd["stream_tail"].to(dev).clone()
        for n in self.layer_names:
            self.counts[n] = sd[f"{n}.counts"].to(dev).clone()
            self.doc_freq[n] = sd[f"{n}.doc_freq"].to(dev).clone()
            self.interval_start[n] = sd[f"{n}.interval_start"].to(dev).clone()
            if n in self.last_doc:
                self.last_doc[n] = sd[f"{n}.last_doc"].to(dev).clone()
        self.micro_batches, self.step = int(meta["micro_batches"]), int(meta["step"])
        self.history = copy.deepcopy(meta["history"])
        if self.sample is not None:
            self.sample.load_state_dict(sd)
