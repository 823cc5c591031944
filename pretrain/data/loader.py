"""Streaming, exactly resumable batches from prepared shards.

Work split: every epoch the split's shards are permuted by (seed, epoch), and their rows, in
that order, make one sequence of N rows, cut into C = world_size * W contiguous, equal parts
(W = max(1, num_workers)): part p is rows [p * N // C, (p + 1) * N // C). Consumer c = rank * W
+ worker reads part (c + epoch) % C, as a list of pieces (shard, first row, end row). Ranks and
DataLoader workers never share a row, together read every row once per epoch, and every reader
holds N // C or N // C + 1 rows of it. The parts move round the readers from epoch to epoch, so
the readers holding one row more take turns: after any number of epochs each has read within
one row of epochs x N / C, and readers taking rows at one pace start each epoch within two rows
of each other.

Loader states of versions 1 and 2 (before 2026-12-06) were saved under the old scheme, whole
shards per reader (reader c reads the shards perm[c::C]; a shard count that is not a multiple
of C leaves the readers unequal, so at one pace some re-read rows while others are still in
their first pass). Such a state resumes that scheme ("scheme": "shards" in its state), so the
run continues with bitwise the batches it would have had; `load_resharded` (another number of
ranks or workers, batch size or shuffle buffer) moves it to the row split from there on.

Position: each consumer's place is (epoch, piece index in its list, row in that shard,
rows already emitted from the window starting there). A window is the next
`shuffle_buffer` rows (permuted by (seed, epoch, consumer, window start)) or, without
shuffling, the next `batch_size` rows. Every batch carries its consumer's position after
it; the main process keeps the positions of the batches it has handed out, plus which
worker the DataLoader's round robin asks next, so `state_dict()` is a few integers per
worker and a rebuilt loader continues with exactly the same batches.

`rows=n` (evaluation, loop=False): only the first n rows of epoch 0's sequence are read, cut
into the C parts as a whole epoch is, so that the ranks together read the rows one rank alone
would read, each once, in the same order (rank 0's part first).

Another number of ranks or workers: `load_resharded(all old ranks' states)` turns what the
saved run had left of its current epoch into an explicit list of pieces per new consumer
(the "plan", part of `state_dict()`); see its docstring for what it guarantees. Epochs after
that one follow the row split with the new consumer count.

Here: ShardLoader, its batches and its DataLoader workers. Which rows each reader reads is
work_plan.py's, reading them from the shards row_cursor.py's, the saved state and what a resume
checks loader_state.py's, a failure shared with every rank loader_failures.py's.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.errors import DataError
from pretrain.data.loader_failures import naming_dead_workers
from pretrain.data.loader_state import (
    LAYOUT_KEYS,
    RESHARD_FIX,
    STATE_VERSION,
    SavedConsumer,
    check_same_settings,
    check_version,
    copy_plan,
    saved_consumers,
    scheme_of,
    summed,
)
from pretrain.data.row_cursor import RowCursor
from pretrain.data.shards import read_manifest, row_doc_ids
from pretrain.data.tokenizer import Tokenizer
from pretrain.data.work_plan import ROWS, epoch_order, head_of, part_of, row_count, work_of
from pretrain.slurm import HELPER_IGNORED, end_stop_immune_workers_at_exit, ignore_stop_signals, stop_signals_blocked
from pretrain.words import counted

IGNORE_INDEX = -100


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, seq_len) int64
    targets: torch.Tensor  # (B, seq_len) int64, IGNORE_INDEX where the target is padding
    doc_ids: torch.Tensor  # (B, seq_len) int64 document id of each input token, -1 on padding
    # (B,) int64 stream of each row: the reader whose contiguous stream of documents it continues
    # (ShardLoader: the worker; MixtureLoader: source index x workers + worker); None: unknown
    streams: torch.Tensor | None = None


def check_tokenizer(manifest: dict, tok: Tokenizer, dataset_dir: Path) -> None:
    if tok.sha256 != manifest.get("tokenizer_sha256"):
        raise DataError(
            f"tokenizer {tok.path} (sha256 {tok.sha256[:12]}) differs from the one {dataset_dir}/manifest.json "
            f"was built with (sha256 {str(manifest.get('tokenizer_sha256'))[:12]}): use the dataset's "
            "tokenizer.model or re-run tools/prepare_data.py with this tokenizer"
        )


class ShardLoader:
    """Iterate batches of one split for one rank; see the module docstring for the scheme."""

    def __init__(
        self,
        dataset_dir: str | Path,
        split: str = "train",
        batch_size: int = 16,
        seq_len: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 0,
        on_corrupt: str = "error",
        loop: bool = True,
        tokenizer: Tokenizer | None = None,
        rows: int | None = None,
    ):
        self.root = Path(dataset_dir)
        manifest = read_manifest(self.root)
        if split not in manifest["splits"]:
            raise DataError(f"split {split!r} is not in {self.root}/manifest.json (has {sorted(manifest['splits'])})")
        if seq_len is not None and seq_len != manifest["seq_len"]:
            raise DataError(
                f"data.seq_len={seq_len} but {self.root} was prepared with seq_len={manifest['seq_len']}: "
                "set data.seq_len to match or re-run tools/prepare_data.py --seq-len"
            )
        if batch_size <= 0:
            raise DataError(f"batch_size={batch_size} must be positive")
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} must be in 0..world_size-1={world_size - 1}")
        if num_workers < 0 or shuffle_buffer < 0:
            raise DataError(f"num_workers={num_workers} and shuffle_buffer={shuffle_buffer} must be >= 0")
        if rows is not None and (rows < 1 or loop):
            raise DataError(f"rows={rows} (the first rows of one epoch) needs rows >= 1 and loop=False (loop={loop})")
        if on_corrupt not in ("error", "skip"):
            raise DataError(f"data.on_corrupt={on_corrupt!r} must be 'error' or 'skip'")
        own_tok = self.root / "tokenizer.model"
        if own_tok.is_file():
            check_tokenizer(manifest, Tokenizer(own_tok), self.root)
        if tokenizer is not None:
            check_tokenizer(manifest, tokenizer, self.root)
        self.shards = manifest["splits"][split]["shards"]
        self.doc_id_offset = manifest["splits"][split]["doc_id_offset"]
        if not self.shards:
            why = (
                "it was prepared with --val-fraction 0; re-run tools/prepare_data.py with --val-fraction > 0 "
                "(e.g. 0.01), or read the 'train' split"
                if split == "val" and manifest.get("val_fraction") == 0
                else "re-run tools/prepare_data.py with more documents or a lower --val-fraction"
            )
            raise DataError(f"split {split!r} of {self.root} is empty (no shards): {why}")
        self.workers = max(1, num_workers)
        consumers = world_size * self.workers
        self.sizes = [int(s["sequences"]) for s in self.shards]
        if sum(self.sizes) < consumers and rows is None:  # rows: evaluation, where a reader may get none
            raise DataError(
                f"split {split!r} of {self.root} has {counted(sum(self.sizes), 'sequence')} but {counted(world_size, 'rank')} "
                f"x {counted(self.workers, 'worker')} = {consumers} readers need at least one each: lower data.num_workers "
                "or the number of ranks, or add text"
            )
        self.split, self.batch_size, self.seq_len = split, batch_size, manifest["seq_len"]
        self.width, self.token_dtype, self.eos_id = manifest["seq_len"] + 1, manifest["token_dtype"], manifest["eos_id"]
        self.vocab_size = manifest["vocab_size"]
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle_buffer, self.on_corrupt, self.loop = seed, shuffle_buffer, on_corrupt, loop
        self.rows = rows
        self.window = shuffle_buffer if shuffle_buffer > 0 else batch_size
        self._fingerprint = hashlib.sha256("|".join(s["sha256"] for s in self.shards).encode()).hexdigest()[:16]
        self.reset()

    # ---- state -------------------------------------------------------------------------
    def reset(self) -> None:
        """Back to the start of epoch 0 for every worker."""
        self._positions = [[0, 0, 0, 0] for _ in range(self.workers)]
        self._next_worker = 0
        self._worker_stats: list[dict] = [{} for _ in range(self.workers)]
        self._batches = 0
        self._plan: dict | None = None  # {"epoch": e, "work": per worker [[shard, first row, end row], ...]}
        if self.rows is not None:  # the first rows of epoch 0, cut into the readers' parts
            head = head_of([[k, 0, self.sizes[k]] for k in epoch_order(self.seed, 0, len(self.sizes))], self.rows)
            consumers, mine = self.world_size * self.workers, self.rank * self.workers
            self._plan = {"epoch": 0, "work": [part_of(head, c, consumers) for c in range(mine, mine + self.workers)]}
        self._scheme = ROWS  # SHARDS only for a run resumed from a state of version 1 or 2

    @property
    def stats(self) -> dict:
        total = {"batches": self._batches, "corrupt_shards_skipped": 0}
        for s in self._worker_stats:
            for k, v in s.items():
                total[k] = total.get(k, 0) + v
        total["epoch"] = min(p[0] for p in self._positions)
        return total

    def _settings(self) -> dict:
        return {
            "split": self.split,
            "batch_size": self.batch_size,
            "rank": self.rank,
            "world_size": self.world_size,
            "workers": self.workers,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
            "shards": self._fingerprint,
        }

    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "settings": self._settings(),
            "positions": [list(p) for p in self._positions],
            "next_worker": self._next_worker,
            "worker_stats": [dict(s) for s in self._worker_stats],
            "batches": self._batches,
            "plan": copy_plan(self._plan, self.sizes),
            "scheme": self._scheme,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` (this rank's, from a run of the same settings) stopped."""
        check_version(state)
        self._check_same_shards(state)
        fix = "resume with the same data, batch size, ranks, workers, seed and shuffle_buffer"
        check_same_settings(
            state.get("settings", {}),
            self._settings(),
            "loader state",
            RESHARD_FIX if self.needs_reshard(state) else fix,
        )
        self._positions = [list(map(int, p)) for p in state["positions"]]
        self._next_worker = int(state["next_worker"])
        self._worker_stats = [dict(s) for s in state["worker_stats"]]
        self._batches = int(state["batches"])
        self._plan = copy_plan(state.get("plan"), self.sizes)
        self._scheme = scheme_of(state)

    def _check_same_shards(self, state: dict) -> None:
        """Refuse a state saved while reading other shards in this folder, naming the folder: a dataset
        prepared again in its place (--overwrite) has other shards, whose rows the saved positions do not
        address (the generic settings message showed two 16-digit fingerprints)."""
        saved = state.get("settings", {}).get("shards")
        if saved is not None and saved != self._fingerprint:
            raise DataError(
                f"{self.root} is not the dataset this run was reading: the {self.split!r} split's shards differ "
                "from those the checkpoint's loader state was saved on (prepared again in this folder since, "
                "e.g. with --overwrite at another --seq-len, --tokenizer, --seed or corpus). A run resumes only "
                "on the data it started on: put that back, or train on the new data in a new run (another "
                "train.run_dir; train.init_from=<an export of this run> keeps its weights)"
            )

    def needs_reshard(self, state: dict) -> bool:
        """True when `state` was saved with another reading layout (ranks, workers, batch size or
        shuffle buffer), which `load_resharded` continues and `load_state_dict` cannot."""
        saved, now = state.get("settings", {}), self._settings()
        return any(saved.get(k) != now[k] for k in LAYOUT_KEYS)

    def load_resharded(self, states: list[dict]) -> str:
        """Continue, on this loader's ranks and workers, a run saved on other ones; a one-line summary.

        `states` are the `state_dict()`s of all ranks of the saved run, in rank order; every new
        rank passes the same list, computes the same global plan and keeps its own consumers' part,
        so the new consumers share the rest of the data without overlap. With e the earliest epoch
        of any old consumer, the rest of epoch e is, per old consumer still in e at (i, j, skip):
        its piece i from row j on, then its later pieces of that epoch. These rows, in that order,
        are cut into as many contiguous, equal parts as there are new consumers (consumer c the
        c-th; shares differ by at most one row); epoch e is then this explicit plan, and epochs
        e+1, ... follow the row split with the new consumer count (also for a run saved under the
        old whole-shard scheme, which a reshard ends). Every row of epoch e is read; rows read
        twice are only the `skip` rows an old consumer had emitted from its shuffle (or batch)
        window starting at (i, j), which is re-read whole (less than one window per old consumer),
        and whatever old consumers already past epoch e had read of later epochs (read again there
        in the new layout). The summary counts them. The plan is in `state_dict()`, so a resharded
        run resumes exactly on the same ranks and workers. Split, seed and shards must match;
        batch size, shuffle_buffer, ranks and workers may change. The counters of the old run
        (batches, corrupt shards skipped) move to new rank 0's first worker, so their sums over
        ranks are kept.
        """
        for state in states[:1]:  # all ranks read the same shards; saved_consumers compares them all
            self._check_same_shards(state)
        old = saved_consumers(states, self._settings(), self.sizes)
        e = min(c.position[0] for c in old)
        rest = [piece for c in old if c.position[0] == e for piece in self._rest_of_epoch(c)]
        partly = sum(started for *_, started in rest)
        twice = sum(c.position[3] if c.position[0] == e else self._rows_past(c, e) for c in old)
        pieces = [piece for *piece, _ in rest]
        consumers, mine = self.world_size * self.workers, self.rank * self.workers
        self.reset()
        self._plan = {"epoch": e, "work": [part_of(pieces, c, consumers) for c in range(mine, mine + self.workers)]}
        self._positions = [[e, 0, 0, 0] for _ in range(self.workers)]
        if self.rank == 0:
            self._batches = sum(int(s["batches"]) for s in states)
            self._worker_stats[0] = summed(w for s in states for w in s["worker_stats"])
        return (
            f"data: readers {len(old)} -> {consumers}: epoch {e} continues with its {row_count(pieces)} rows left, "
            f"{partly} partly read and {len(pieces) - partly} unread pieces of shards ({twice or 'no'} rows read twice)"
        )

    def _rest_of_epoch(self, c: "SavedConsumer") -> list[tuple[int, int, int, bool]]:
        """(shard, first row, end row, partly read) of each piece old consumer `c` had left of its epoch."""
        epoch, i, j, skip = c.position
        work = work_of(c.scheme, c.settings, c.plan, self.sizes, c.worker, epoch)[i:]
        rest = [
            (shard, max(first, j), end, j > first or skip > 0) if n == 0 else (shard, first, end, False)
            for n, (shard, first, end) in enumerate(work)
        ]
        return [piece for piece in rest if piece[1] < piece[2]]

    def _rows_past(self, c: "SavedConsumer", e: int) -> int:
        """Rows old consumer `c`, already past epoch e, had read after it (at most: corrupt shards skipped)."""
        epoch, i, j, skip = c.position

        def work(x: int) -> list[list[int]]:
            return work_of(c.scheme, c.settings, c.plan, self.sizes, c.worker, x)

        now = work(epoch)
        into = max(j - now[i][1], 0) if i < len(now) else 0
        return sum(row_count(work(x)) for x in range(e + 1, epoch)) + row_count(now[:i]) + into + skip

    # ---- reading -----------------------------------------------------------------------
    def _make_batch(self, pieces: list[tuple[np.ndarray, np.ndarray]], worker: int) -> dict:
        rows = np.concatenate([p[0] for p in pieces])
        meta = np.concatenate([p[1] for p in pieces])
        docs = row_doc_ids(rows, meta[:, 0] + self.doc_id_offset, meta[:, 1], self.eos_id)
        targets = rows[:, 1:].copy()
        targets[docs[:, 1:] < 0] = IGNORE_INDEX
        return {
            "tokens": torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
            "targets": torch.from_numpy(targets),
            "doc_ids": torch.from_numpy(np.ascontiguousarray(docs[:, :-1])),
            "streams": torch.full((len(rows),), worker, dtype=torch.int64),
        }

    def _stream(self, worker: int, pos: list[int], stats: dict) -> Iterator[tuple[dict, list[int]]]:
        """Batches of one consumer from `pos`, each with the consumer's position after it."""
        consumer = self.rank * self.workers + worker
        epoch, i, j, skip = pos
        pieces, have = [], 0
        while True:
            work = work_of(self._scheme, self._settings(), self._plan, self.sizes, worker, epoch)
            from_start = (i, j, skip) == (0, 0, 0)
            cursor = RowCursor(self, work, i, j, stats)
            rows_this_epoch = 0
            while True:
                i, j = cursor.position()
                wtok, wmeta = cursor.take(self.window)
                if not len(wtok):
                    break
                rows_this_epoch += len(wtok)
                if self.shuffle_buffer > 0:
                    perm = np.random.default_rng([self.seed, epoch, consumer, i, j]).permutation(len(wtok))
                    wtok, wmeta = wtok[perm], wmeta[perm]
                end = cursor.position()
                s, skip = skip, 0
                while s < len(wtok):
                    t = min(self.batch_size - have, len(wtok) - s)
                    pieces.append((wtok[s : s + t], wmeta[s : s + t]))
                    have, s = have + t, s + t
                    if have == self.batch_size:
                        after = [epoch, i, j, s] if s < len(wtok) else [epoch, end[0], end[1], 0]
                        yield self._make_batch(pieces, worker), after
                        pieces, have = [], 0
            if not self.loop:
                if have:
                    yield self._make_batch(pieces, worker), [epoch, len(work), 0, 0]
                return
            if rows_this_epoch == 0 and from_start and work:  # a reshard may leave a consumer none
                raise DataError(
                    f"epoch {epoch} of consumer {consumer} read no sequence from {self.root} "
                    "(all its shards corrupt?): re-create the dataset"
                )
            epoch, i, j, skip = epoch + 1, 0, 0, 0

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._positions[0][0]  # loop=False never moves a worker past its epoch
        if self.num_workers == 0:
            stats = self._worker_stats[0]
            for arrays, after in self._stream(0, list(self._positions[0]), stats):
                self._positions[0] = after
                self._batches += 1
                yield Batch(**arrays)
        else:
            dataset = _WorkerDataset(self, [list(p) for p in self._positions], self._next_worker)
            # its own generator: the workers' base seed (unused, the stream is seeded by position) is
            # drawn from it, not from the global one, whose state a checkpoint restores before this
            # iteration starts: a resumed run's dropout, say, then draws what an uninterrupted run does
            seeds = torch.Generator().manual_seed(self.seed)
            end_stop_immune_workers_at_exit()
            dl = DataLoader(
                dataset,
                batch_size=None,
                num_workers=self.num_workers,
                persistent_workers=False,
                # forked from this process whatever the default start method: under a fork server's
                # (a process it started; Python 3.14's default) the workers' parent was a fork server
                # they kept alive, so torch's worker watchdog, which ends a worker whose parent has
                # gone, never fired and a killed rank's workers lived on
                multiprocessing_context="fork",
                generator=seeds,
                worker_init_fn=ignore_stop_signals,  # Slurm's stop signals reach the workers too
            )
            with stop_signals_blocked(HELPER_IGNORED):  # the workers are forked here, and ignore them before unblocking
                batches = iter(dl)
            for item in naming_dead_workers(batches):
                if "error" in item:
                    raise item["error"]
                w = item.pop("worker")
                self._positions[w] = item.pop("position")
                self._worker_stats[w] = item.pop("stats")
                self._next_worker = (w + 1) % self.workers
                self._batches += 1
                yield Batch(**item)
        if not self.loop:  # a finished epoch: the next iteration reads the next one
            self._positions = [[epoch + 1, 0, 0, 0] for _ in self._positions]
            self._next_worker = 0


class _WorkerDataset(IterableDataset):
    """Runs one logical worker's stream inside a DataLoader worker process."""

    def __init__(self, loader: ShardLoader, positions: list[list[int]], rotation: int):
        self.loader, self.positions, self.rotation = loader, positions, rotation

    def __iter__(self):
        info = get_worker_info()
        # DataLoader asks its workers 0, 1, ... in turn; rotating the logical ids makes the
        # round robin start at the worker that was next when the state was saved.
        worker = (info.id + self.rotation) % info.num_workers
        stats = dict(self.loader._worker_stats[worker])
        try:
            for arrays, after in self.loader._stream(worker, self.positions[worker], stats):
                arrays.update(worker=worker, position=after, stats=dict(stats))
                yield arrays
        except DataError as err:
            # raised here, torch re-raises it in the main process with the worker's traceback as its
            # message ("Caught CorruptShardError in DataLoader worker process 0. Original Traceback
            # ..."), which every rank would then print as the error: sent as it is, raised there
            yield {"error": err}
