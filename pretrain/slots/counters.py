"""Slot access counters for memory layers: counts, document frequencies, reduction.

This module owns the per-rank counting state of `SlotStatistics` (counts, document
frequencies, totals, the open-occurrence tables), its reduction over ranks and its
checkpoint state. Per memory layer (or per shared value table: pass the concatenation of
its layers' indices along the heads dimension under its own name) it keeps, on the device:
  counts[i]    top-k hits of slot i, over tokens, heads and k;
  doc_freq[i]  number of units (document occurrences, sequences or chunks; see
               granularity.py for why the unit matters) in which slot i was selected;
  num_documents, num_tokens  units, and input tokens read (padding excluded; the train state's
               tokens_seen counts positions, padding included).
`update` uses only fixed-shape device ops (sort, index_add, scatter): no host sync. On the CPU
the same numbers come from one compiled walk over the tokens (kernels/csrc/slot_counts.cpp).

Documents are counted per read. The data arrives as contiguous streams (one per
DataLoader worker of each data source); an occurrence is a maximal run of equal doc ids
in one stream, so a document read again (the next epoch, a source repeated in a mixture)
is a new occurrence, counted again in num_documents and in the doc_freq of every slot it
selects, the slots only it uses included. One occurrence can straddle rows, micro-batches,
steps and checkpoints:
  * each row of a micro-batch belongs to a stream: `update(..., streams=(B,) ids)` (the
    loaders' `Batch.streams`), or, without ids, stream = micro-batch index % `streams`
    (DataLoader workers deliver whole batches round-robin). A stream's rows within a
    micro-batch are consecutive pieces of it, so the batch is read stream-major (rows
    stably sorted by stream) and each stream's segment row-major;
  * every occurrence gets an id from its stream's counter `next_occurrence`; a run of
    equal doc ids starts a new one, except the first run of a stream's segment when its
    doc id is the one that ended the stream's previous segment (`stream_tail`): it goes
    on with that occurrence (id next_occurrence - 1);
  * per layer and stream, `last_occurrence[stream, s]` is the occurrence that last
    selected slot s; occurrences of a stream are contiguous and increasing, so a
    (slot, occurrence) pair counts iff the slot's last occurrence is another one.
Not merged: a document whose pieces are read by different streams or ranks (at a shard
boundary, or where the loader's row split cuts an epoch's rows between two readers) counts
once per piece, and so does a document read at a change of the stream
layout (load_resharded, another number of streams, a format-1 state). Two reads of one
document directly after each other in one stream (a reader with a single document) are
one run, hence one occurrence. Shuffling sequences (data.shuffle_buffer > 0) splits
documents into many pieces. Padding: doc ids < 0 are excluded everywhere.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from kernels import cpu_ops
from pretrain.slots.granularity import parse_granularity, unit_ids
from pretrain.slots.sample import BackgroundSample, SampleData
from pretrain.slots.summary import distribution_summary

STATE_FORMAT = "slot_statistics/2"  # 2: occurrence ids (1: doc ids) in the open tables
OLD_FORMATS = ("slot_statistics/1",)  # still loaded: the open tables start afresh
# per counter, at each reduce(close_interval=True): slots used so far and in the interval (ints),
# the interval's top-1% share and KL from uniform (floats; NaN where a checkpoint predates them)
HISTORY = ("used", "interval_used", "interval_top1pct_share", "interval_kl_uniform")


class SlotStatistics:
    """This rank's slot access counters, one set per name in `layer_names` (a memory layer, or a
    shared table's joined stream): `update` once per micro-batch, `begin_step` / `discard_step`
    around a step, `reduce` over ranks for logs and tables, `state_dict` per rank for checkpoints."""

    def __init__(
        self,
        num_slots: int,
        layer_names: list[str],
        granularity: str = "document",
        device="cpu",
        sample_batches: int = 0,
        seed: int = 0,
        streams: int = 1,
    ):
        if num_slots <= 0 or not layer_names:
            raise ValueError(
                f"SlotStatistics needs num_slots > 0 and at least one layer name "
                f"(got num_slots={num_slots}, layer_names={layer_names})"
            )
        if len(set(layer_names)) != len(layer_names):
            raise ValueError(f"layer_names {layer_names} lists a layer twice")
        if streams <= 0:
            raise ValueError(f"streams={streams} must be >= 1 (data sources x data loader workers, or 1)")
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
        # per stream: the occurrence that last selected each slot (column N absorbs writes that must not land)
        self.last_occurrence = {n: z(streams, num_slots + 1, fill=-1) for n in self.layer_names} if is_doc else {}
        self.stream_tail = z(streams, fill=-1)  # doc id at the end of each stream's last segment
        self.next_occurrence = z(streams)  # id of each stream's next occurrence
        self.micro_batches, self.step = 0, 0
        self.first_step = 0  # steps up to it were not counted (a resume from a checkpoint without statistics)
        self.history: dict[str, list] = {"step": [], **{f"{n}.{k}": [] for n in self.layer_names for k in HISTORY}}
        self.sample = BackgroundSample(sample_batches, self.layer_names, seed) if sample_batches else None
        self.reduced = False
        self._reduced_sample: SampleData | None = None
        self._interval_summary: dict[str, dict] = {}  # a reduced copy's, per counter: taken by reduce()
        self._before_step: dict[str, torch.Tensor] | None = None  # begin_step's copy, for discard_step

    # ---- counting -------------------------------------------------------------------
    def update(
        self,
        layer_indices: list[torch.Tensor],
        doc_ids: torch.Tensor,
        *,
        streams: torch.Tensor | None = None,
    ) -> None:
        """Count one micro-batch: layer_indices[l] (B*S, H, k) slot ids, doc_ids (B, S), and
        optionally streams (B,): each row's stream id in [0, self.streams) (`Batch.streams`;
        range-checked when given on the CPU). Without it the whole micro-batch is stream
        (micro-batch index % self.streams)."""
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
        if streams is not None:
            self._check_streams(streams, B)
        item = self.micro_batches
        self.micro_batches += 1
        T = B * S
        flat = doc_ids.reshape(T).to(self.device, torch.int64)
        valid = flat >= 0
        self.totals[1] += valid.sum()
        if self.granularity.kind == "document":
            if streams is None:
                streams = torch.full((B,), item % self.streams, dtype=torch.int64, device=self.device)
            occ = self._occurrences(flat, streams.to(self.device, torch.int64), B, S)
        else:
            unit = unit_ids(self.granularity, flat.view(B, S))
            occupied = torch.zeros(self._units_per_batch(B, S), dtype=torch.int64, device=self.device)
            occupied.scatter_reduce_(0, unit, valid.long(), "amax")
            self.totals[0] += occupied.sum()
        for name, idx in zip(self.layer_names, layer_indices):
            if self.granularity.kind == "document":
                self._count_documents(name, idx.to(self.device), valid, *occ)
            else:
                self._count_units(name, idx.to(self.device), unit, valid)
        if self.sample is not None and T:  # an empty micro-batch has nothing to keep
            self.sample.offer(item, layer_indices, doc_ids)

    def _check_streams(self, streams: torch.Tensor, B: int) -> None:
        if streams.shape != (B,) or streams.is_floating_point():
            raise ValueError(
                f"streams must be ({B},) integer stream ids, one per row; got {streams.dtype} {tuple(streams.shape)}"
            )
        if streams.device.type == "cpu" and B and not (0 <= int(streams.min()) and int(streams.max()) < self.streams):
            raise ValueError(
                f"stream ids {sorted(set(streams.tolist()))} must lie in [0, {self.streams}): SlotStatistics(streams=...) "
                f"must be the number of data sources x max(1, data loader workers)"
            )

    def _occurrences(self, flat, streams, B: int, S: int):
        """Per position of the stream-major order (rows stably sorted by stream, the order units
        count in): the flat token there (`perm`), its unit (the first position of its run; a run:
        equal doc ids within one stream's segment), occurrence id and stream. For the document
        granularity; advances the streams' occurrence counters and tails."""
        T, dev = B * S, self.device
        order = torch.sort(streams, stable=True).indices
        perm = (order[:, None] * S + torch.arange(S, device=dev)).reshape(T)
        doc = flat[perm]
        stream = streams[order][:, None].expand(B, S).reshape(T)
        pos = torch.arange(T, device=dev)
        seg_start = torch.ones(T, dtype=torch.bool, device=dev)
        seg_start[1:] = stream[1:] != stream[:-1]
        run_start = seg_start.clone()
        run_start[1:] |= doc[1:] != doc[:-1]
        new = run_start & ~(seg_start & (doc == self.stream_tail[stream]))  # else: goes on with the tail's
        self.totals[0] += (new & (doc >= 0)).sum()
        # occurrence = the stream's next id + new occurrences so far in the segment - 1
        taken = new.long().cumsum(0)
        seg_first = torch.where(seg_start, pos, 0).cummax(0).values
        before = (taken - new.long())[seg_first]
        occurrence = self.next_occurrence[stream] + taken - before - 1
        unit = torch.where(run_start, pos, 0).cummax(0).values
        # each stream present: its new occurrences counted, the doc id ending its segment kept (the
        # other positions write to a dummy last entry; a stream absent from the micro-batch, or an
        # empty micro-batch, leaves its tail as it was)
        self.next_occurrence.index_add_(0, stream, new.long())
        seg_end = torch.ones(T, dtype=torch.bool, device=dev)
        seg_end[:-1] = stream[1:] != stream[:-1]
        tail = torch.cat([self.stream_tail, self.stream_tail.new_full((1,), -1)])
        self.stream_tail = tail.scatter_(0, torch.where(seg_end, stream, self.streams), doc)[: self.streams]
        return perm, unit, occurrence, stream

    def _units_per_batch(self, B: int, S: int) -> int:
        g = self.granularity
        return B if g.kind == "sequence" else B * -(-S // g.chunk)

    def _pairs(self, name, idx, unit, valid):
        """Add the micro-batch's slot hits to `counts[name]` and return its (slot, unit) pairs as
        sorted keys slot * T + unit (padding -1, first): (keys, whether each key is the first of
        its run, i.e. a distinct pair; each key's slot, padding -> N)."""
        N, T = self.num_slots, valid.numel()
        key_dtype = torch.int32 if N * T <= 2**31 else torch.int64
        # slot-major keys: each slot's pairs are contiguous, its latest unit last; padding
        # gets key -1 and sorts first
        keys = idx.flatten(1).to(key_dtype) * T + unit.to(key_dtype)[:, None]
        keys = torch.where(valid[:, None], keys, torch.full_like(keys, -1)).reshape(-1)
        s = keys.sort().values
        ok = s >= 0
        first = ok.clone()
        first[1:] &= s[1:] != s[:-1]
        slot_of = torch.where(ok, s // T, N).long()  # padding -> N, a dummy slot
        self.counts[name].index_add_(0, slot_of.clamp(max=N - 1), ok.long())
        return s, first, slot_of

    def _count_units(self, name, idx, unit, valid) -> None:
        """One layer's counts and unit frequencies for sequence and chunk units: every unit lies
        within the micro-batch, so nothing carries over to the next."""
        _, first, slot_of = self._pairs(name, idx, unit, valid)
        self.doc_freq[name].index_add_(0, slot_of.clamp(max=self.num_slots - 1), first.long())

    def _count_documents(self, name, idx, valid, perm, unit, occurrence, stream) -> None:
        """One layer's counts and document frequencies: on the CPU in one walk over the tokens
        (`kernels.cpu_ops.count_document_slots_`, the same numbers), else by sorting the pairs."""
        if not cpu_ops.count_document_slots_(
            self.counts[name],
            self.doc_freq[name],
            self.last_occurrence[name],
            idx.flatten(1),  # (T, heads * k); reshape(T, -1) is ambiguous for T = 0
            perm,
            valid,
            occurrence,
            stream,
        ):
            self._count_documents_sorted(name, idx, valid, unit[perm.argsort()], occurrence, stream)

    def _count_documents_sorted(self, name, idx, valid, unit, occurrence, stream) -> None:
        """`_count_documents` by sorting the (slot, unit) pairs: a (slot, occurrence) pair counts
        unless the occurrence selected the slot in an earlier micro-batch (it is then the slot's
        last one in its stream). `unit`: per token in flat order."""
        N, T = self.num_slots, valid.numel()
        s, first, slot_of = self._pairs(name, idx, unit, valid)
        at = (s % T).long()  # the unit: a position in stream-major order
        occ_of, cell = occurrence[at], stream[at] * (N + 1) + slot_of  # padding -> column N
        last = self.last_occurrence[name].view(-1)
        new = first & (last[cell] != occ_of)
        self.doc_freq[name].index_add_(0, slot_of.clamp(max=N - 1), new.long())
        # within a slot, pairs are in stream-major order of their units: a stream's latest last
        is_last = s >= 0
        is_last[:-1] &= cell[1:] != cell[:-1]
        last.scatter_(0, torch.where(is_last, cell, N), occ_of)

    def end_step(self, step: int) -> None:
        """Mark an optimizer-step boundary; `step` is recorded in history and tables."""
        self.step = int(step)

    def start_at(self, step: int) -> None:
        """Counting begins after `step` (a run resumed from a checkpoint that holds no statistics):
        the first interval and the table's `first_step` say so."""
        if self.micro_batches or self.history["step"]:
            raise RuntimeError("start_at() must come before the first update")
        self.step = self.first_step = int(step)

    # ---- skipped steps ------------------------------------------------------------------
    def begin_step(self) -> None:
        """Remember the counting state before a step's first micro-batch, so that `discard_step`
        can take the step back. Device copies into buffers kept between steps, no host sync."""
        mine = self._step_state()
        if self._before_step is None:
            self._before_step = {k: t.clone() for k, t in mine.items()}
        else:
            for k, t in mine.items():
                self._before_step[k].copy_(t)
        if self.sample is not None:
            self.sample.begin_step()

    def discard_step(self) -> None:
        """Take back every micro-batch counted since `begin_step`: the step's update was skipped
        (a non-finite loss), so its accesses are not counted, nor its tokens and documents, nor its
        background-sample entries (a diverged forward reads NaN scores, whose top-k piles every
        token onto a few slots). The micro-batch index goes on, so data streams and the sample's
        choices for later micro-batches stay those of the loaders' order. A document read on both
        sides of the step stays one occurrence."""
        if self._before_step is None:
            raise RuntimeError("discard_step() without begin_step() at the start of the step")
        for k, t in self._step_state().items():
            t.copy_(self._before_step[k])
        if self.sample is not None:
            self.sample.discard_step()

    def _step_state(self) -> dict[str, torch.Tensor]:
        """The tensors `update` changes in place (the sample aside), by a name of their own."""
        out = {"totals": self.totals, "stream_tail": self.stream_tail, "next_occurrence": self.next_occurrence}
        for n in self.layer_names:
            out[f"{n}.counts"], out[f"{n}.doc_freq"] = self.counts[n], self.doc_freq[n]
            if n in self.last_occurrence:
                out[f"{n}.last_occurrence"] = self.last_occurrence[n]
        return out

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
                shape = out._interval_summary[n] = distribution_summary(interval)  # summary() reuses it
                self.history[f"{n}.interval_top1pct_share"].append(shape["top1pct_share"])
                self.history[f"{n}.interval_kl_uniform"].append(shape["kl_uniform"])
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
        # ranks whose samples saw other micro-batch sizes (a resume on other ranks and micro-batch):
        # the smaller entries get padding rows (doc id -1), as within one rank's sample
        rows = max(p.doc_ids.shape[1] for p in parts)

        def pad(t, extra, fill):
            return torch.cat([t, t.new_full((t.shape[0], extra, *t.shape[2:]), fill)], dim=1)

        seq = parts[0].doc_ids.shape[2]
        return SampleData(
            {
                n: torch.cat([pad(p.indices[n], (rows - p.doc_ids.shape[1]) * seq, 0) for p in parts])
                for n in self.layer_names
            },
            torch.cat([pad(p.doc_ids, rows - p.doc_ids.shape[1], -1) for p in parts]),
            torch.cat([p.batch_index for p in parts]),
        )

    def _copy(self) -> "SlotStatistics":
        out = object.__new__(SlotStatistics)
        out.__dict__.update(
            {
                k: v
                for k, v in self.__dict__.items()
                if k not in ("counts", "doc_freq", "interval_start", "last_occurrence", "sample", "_before_step")
            }
        )
        out._before_step = None
        out.counts = {n: t.clone() for n, t in self.counts.items()}
        out.doc_freq = {n: t.clone() for n, t in self.doc_freq.items()}
        out.interval_start = {n: t.clone() for n, t in self.interval_start.items()}
        out.totals, out.interval_start_totals = self.totals.clone(), self.interval_start_totals.clone()
        out.stream_tail, out.next_occurrence = self.stream_tail.clone(), self.next_occurrence.clone()
        out.last_occurrence, out.sample = {}, None
        out.history = copy.deepcopy(self.history)
        out.reduced = True
        out._interval_summary = {}  # reduce() fills it
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
                # a reduced copy's counts are fixed: the distribution reduce() took for the history
                cached = self._interval_summary.get(n)
                shape = cached or distribution_summary(self.counts[n] - self.interval_start[n])
                for k, v in shape.items():
                    out[f"slots/{n}/interval/{k}"] = v
        return out

    def last_interval(self) -> tuple[int, int]:
        """First and last step of the interval that the latest reduce(close_interval=True) closed."""
        steps = self.history["step"]
        if not steps:
            raise RuntimeError("no interval closed yet: call reduce(close_interval=True) first")
        return (steps[-2] + 1 if len(steps) > 1 else self.first_step + 1), steps[-1]

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
            "next_occurrence": self.next_occurrence.cpu().clone(),
        }
        for n in self.layer_names:
            sd[f"{n}.counts"] = self.counts[n].cpu().clone()
            sd[f"{n}.doc_freq"] = self.doc_freq[n].cpu().clone()
            sd[f"{n}.interval_start"] = self.interval_start[n].cpu().clone()
            if n in self.last_occurrence:
                sd[f"{n}.last_occurrence"] = self.last_occurrence[n].cpu().clone()
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
            "first_step": self.first_step,
            "seed": self.seed,
            "reduced": self.reduced,
            "sample_batches": self.sample.capacity if self.sample is not None else 0,
            "history": copy.deepcopy(self.history),
        }
        return sd

    def _check_state(self, sd: dict) -> dict:
        meta = sd.get("meta", {})
        if meta.get("format") not in (STATE_FORMAT, *OLD_FORMATS):
            raise ValueError(f"slot statistics state has format {meta.get('format')!r}, expected {STATE_FORMAT!r}")
        mine = {
            "num_slots": self.num_slots,
            "layer_names": self.layer_names,
            "granularity": self.granularity.name,
            "sample_batches": self.sample.capacity if self.sample else 0,
        }
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
        is exactly the saved one. Open occurrences are forgotten: a document being
        read at the reshard counts once more in `doc_freq` where its rest is read (at most one
        per old reader, as at a shard boundary or a cut between readers). Rank r keeps old rank r's background sample.
        States of format 1 load too."""
        metas = [self._check_state(sd) for sd in states]
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

        def summed(key: str) -> torch.Tensor:
            return sum(sd[key].to(self.device) for sd in states)

        def zeros(key: str) -> torch.Tensor:
            return torch.zeros_like(states[0][key], device=self.device)

        take = summed if rank == 0 else zeros
        self.totals, self.interval_start_totals = take("totals"), take("interval_totals")
        for n in self.layer_names:
            self.counts[n], self.doc_freq[n] = take(f"{n}.counts"), take(f"{n}.doc_freq")
            self.interval_start[n] = take(f"{n}.interval_start")
        self._forget_open_occurrences()
        self.micro_batches, self.step = int(metas[0]["micro_batches"]), int(metas[0]["step"])
        self.first_step = int(metas[0].get("first_step", 0))
        self.history = self._history_from(metas[0]["history"])
        if self.sample is not None and rank < len(states):
            self.sample.load_state_dict(states[rank])
        return "slot counters summed into rank 0" if len(states) > 1 else "slot counters kept on rank 0"

    def _history_from(self, saved: dict) -> dict[str, list]:
        """A checkpoint's history; series it predates (top-1% share, KL) are NaN at its points."""
        points = len(saved["step"])
        return {k: copy.deepcopy(saved.get(k, [float("nan")] * points)) for k in self.history}

    def _forget_open_occurrences(self) -> None:
        """The documents being read count as new occurrences where they go on."""
        for table in self.last_occurrence.values():
            table.fill_(-1)
        self.stream_tail.fill_(-1)
        self.next_occurrence.zero_()

    def load_state_dict(self, sd: dict) -> None:
        """Continue from this rank's `state_dict()`. A state of format 1 (doc ids in the open
        tables) or of another number of streams (the data sources or workers changed) keeps
        its counts and totals but not the open occurrences: each document being read then
        counts once more where its rest is read (at most once per stream)."""
        meta = self._check_state(sd)
        dev = self.device
        self.totals = sd["totals"].to(dev).clone()
        self.interval_start_totals = sd["interval_totals"].to(dev).clone()
        for n in self.layer_names:
            self.counts[n] = sd[f"{n}.counts"].to(dev).clone()
            self.doc_freq[n] = sd[f"{n}.doc_freq"].to(dev).clone()
            self.interval_start[n] = sd[f"{n}.interval_start"].to(dev).clone()
        if meta["format"] == STATE_FORMAT and meta["streams"] == self.streams:
            self.stream_tail = sd["stream_tail"].to(dev).clone()
            self.next_occurrence = sd["next_occurrence"].to(dev).clone()
            for n in self.last_occurrence:
                self.last_occurrence[n] = sd[f"{n}.last_occurrence"].to(dev).clone()
        else:
            self._forget_open_occurrences()
        self.micro_batches, self.step = int(meta["micro_batches"]), int(meta["step"])
        self.first_step = int(meta.get("first_step", 0))
        self.history = self._history_from(meta["history"])
        if self.sample is not None:
            self.sample.load_state_dict(sd)
