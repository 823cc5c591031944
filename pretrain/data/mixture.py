"""A weighted mixture of prepared datasets, as one resumable iterator of batches.

Each source is read by its own `ShardLoader` (its own shard order, workers and position).
For every row of a batch, a generator seeded by (seed, rank) draws the source in
proportion to the weights; the row is the next unread sequence of that source. A source
loader hands over whole batches, so the mixture keeps, per source, the batch it is
reading from, how many of its rows are used, and the source loader's state from *before*
that batch (a used-up batch gives way to the state after it at once). `state_dict()` is
the generator state plus those per-source (state, offset) pairs: a rebuilt mixture
reloads each source, re-reads its current batch and skips the rows already used, so
resumed batches are bitwise those of an uninterrupted run.

On another number of ranks or workers, `load_resharded(all old ranks' states)` reshards
each source's loader (`ShardLoader.load_resharded`) and reseeds the source draws; see its
docstring.

The sources may change on resume (an annealing mixture for a run's decay; a corpus added
mid-run): sources are known by name, the draws go on from the saved generator, every kept
source from its own position (no sequence read twice or skipped), an added source from its
beginning; a removed source's position is dropped. Only which source each later row comes
from follows the new sources and weights.

Document ids are made unique across sources by offsetting each source's ids by the
documents of the sources before it. Row streams (`Batch.streams`) are source index x workers
+ the source's worker: each (source, worker) reads one contiguous stream of documents, and
its rows keep their order within a batch. A mixture of one source yields exactly the batches
of its `ShardLoader`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pretrain.data.errors import DataError
from pretrain.data.loader import Batch, ShardLoader
from pretrain.data.loader_state import RESHARD_FIX, check_same_settings
from pretrain.data.sources import Source

STATE_VERSION = 1
_MIXTURE_STREAM = 0x6D6978  # keeps the source draws apart from any other use of (seed, rank)


class MixtureLoader:
    """Batches of `batch_size` rows drawn from `sources` by weight; one per rank."""

    def __init__(
        self,
        sources: list[Source],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 0,
        on_corrupt: str = "error",
        seq_len: int | None = None,
    ):
        if not sources:
            raise DataError("a mixture needs at least one source: set data.dir or data.sources")
        self.sources = sources
        self.loaders = [
            ShardLoader(
                s.dir,
                "train",
                batch_size,
                seq_len,
                rank,
                world_size,
                num_workers,
                seed,
                shuffle_buffer,
                on_corrupt,
                loop=True,
            )
            for s in sources
        ]
        self.batch_size, self.rank, self.seed = batch_size, rank, seed
        self.seq_len = self.loaders[0].seq_len
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.probabilities = weights / weights.sum()
        self._cumulative = np.cumsum(self.probabilities)[:-1]  # source = number of bounds below a uniform draw
        docs = [int(s.manifest["documents"]) for s in sources]
        self.doc_offsets = [sum(docs[:i]) for i in range(len(docs))]
        self._doc_offsets = np.asarray(self.doc_offsets, dtype=np.int64)
        self._offsets_needed = any(self.doc_offsets)
        self.reset()

    def reset(self) -> None:
        self._rng = np.random.default_rng([self.seed, self.rank, _MIXTURE_STREAM])
        for loader in self.loaders:
            loader.reset()
        n = len(self.loaders)
        self._iters: list[Iterator[Batch] | None] = [None] * n
        self._current: list[Batch | None] = [None] * n  # the batch each source is being read from
        self._used = [0] * n  # rows of that batch already handed out
        self._state_before = [loader.state_dict() for loader in self.loaders]
        self.sequences = [0] * n  # rows drawn from each source by this rank

    # ---- state -------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {
            "sources": [s.name for s in self.sources],
            "weights": [s.weight for s in self.sources],
            "batch_size": self.batch_size,
            "rank": self.rank,
            "seed": self.seed,
        }

    def state_dict(self) -> dict:
        rng = self._rng.bit_generator.state
        return {
            "version": STATE_VERSION,
            "settings": self._settings(),
            "rng": {
                "state": str(rng["state"]["state"]),
                "inc": str(rng["state"]["inc"]),
                "has_uint32": int(rng["has_uint32"]),
                "uinteger": int(rng["uinteger"]),
            },
            "sources": [{"loader": before, "used": used} for before, used in zip(self._state_before, self._used)],
            "sequences": list(self.sequences),
        }

    def _as_mixture_state(self, state: dict) -> dict:
        """`state` checked for its version; a plain ShardLoader state as a mixture of one."""
        if "positions" in state and "sources" not in state:  # a checkpoint of a plain ShardLoader run
            if len(self.loaders) != 1:
                raise DataError(
                    "the checkpoint was written by a single-dataset run; resume it with that "
                    "dataset alone (data.dir) or start a new run directory for the mixture"
                )
            state = {
                "version": STATE_VERSION,
                "settings": self._settings(),
                "rng": None,
                "sources": [{"loader": state, "used": 0}],
                "sequences": [0],
            }
        if state.get("version") != STATE_VERSION:
            raise DataError(f"mixture state version {state.get('version')!r} is not {STATE_VERSION}")
        return state

    def _saved_sources(self, state: dict) -> list[tuple[int, dict, int]]:
        """(index here, saved {"loader", "used"}, rows drawn) of each source this mixture shares,
        by name, with the mixture `state` was saved from; the other sources here are new."""
        names = state.get("settings", {}).get("sources") or []
        saved = {name: (src, int(n)) for name, src, n in zip(names, state["sources"], state["sequences"])}
        return [(i, *saved[s.name]) for i, s in enumerate(self.sources) if s.name in saved]

    def needs_reshard(self, state: dict) -> bool:
        """True when `state` was saved on another number of ranks or workers (see load_resharded)."""
        state = self._as_mixture_state(state)
        return any(self.loaders[i].needs_reshard(src["loader"]) for i, src, _ in self._saved_sources(state))

    def _resume_settings(self) -> dict:
        """What a resume must keep: all settings but the sources and their weights."""
        return {k: v for k, v in self._settings().items() if k not in ("sources", "weights")}

    def load_state_dict(self, state: dict) -> None:
        moved = self.needs_reshard(state)
        state = self._as_mixture_state(state)
        fix = "resume with the same batch size and seed (data.sources may change)"
        check_same_settings(
            state.get("settings", {}), self._resume_settings(), "data state", RESHARD_FIX if moved else fix
        )
        self.reset()
        if state["rng"] is not None:
            r = state["rng"]
            self._rng.bit_generator.state = {
                "bit_generator": "PCG64",
                "state": {"state": int(r["state"]), "inc": int(r["inc"])},
                "has_uint32": int(r["has_uint32"]),
                "uinteger": int(r["uinteger"]),
            }
        for i, saved, drawn in self._saved_sources(state):
            self.loaders[i].load_state_dict(saved["loader"])
            self._state_before[i] = saved["loader"]
            self._used[i] = int(saved["used"])
            self.sequences[i] = drawn

    def load_resharded(self, states: list[dict]) -> str:
        """Continue, on this mixture's ranks and workers, a run saved on other ones; a one-line summary.

        `states` are the `state_dict()`s of all ranks of the saved run, in rank order. Each
        source's loader is resharded from the old ranks' states of that source
        (`ShardLoader.load_resharded`: no row of the current epoch is lost). Those states are from
        before the batch each old rank was reading, so its rows already used are read again:
        at most one batch per source per old rank, on top of the loader's own re-reads; the
        summary counts both. The source draws restart from a generator seeded by (seed, new
        rank, rows drawn before the reshard), not the stream the run started with; its
        state is in `state_dict()`, so a resharded run resumes exactly. The rows drawn per source
        move to new rank 0 (their sums over ranks are kept). The seed must match; sources (as in
        `load_state_dict`: an added one starts at its beginning), weights, batch size, ranks and
        workers may change.
        """
        states = [self._as_mixture_state(s) for s in states]
        mine = {"seed": self.seed}
        fix = "a run continues on other ranks only with the same seed"
        for state in states:
            check_same_settings(state.get("settings", {}), mine, "data state", fix)
        self.reset()
        saved = [self._saved_sources(s) for s in states]  # every rank saved the same sources
        lines = {
            i: self.loaders[i].load_resharded([per_rank[k][1]["loader"] for per_rank in saved])
            for k, (i, _, _) in enumerate(saved[0])
        }
        self._state_before = [loader.state_dict() for loader in self.loaders]
        drawn = [0] * len(self.loaders)
        for k, (i, _, _) in enumerate(saved[0]):
            drawn[i] = sum(per_rank[k][2] for per_rank in saved)
        self.sequences = drawn if self.rank == 0 else [0] * len(drawn)
        self._rng = np.random.default_rng([self.seed, self.rank, _MIXTURE_STREAM, sum(drawn)])
        used = sum(int(src["used"]) for per_rank in saved for _, src, _ in per_rank)
        per_source = "; ".join(
            f"{src.name}: {lines[i].removeprefix('data: ') if i in lines else 'new, from its start'}"
            for i, src in enumerate(self.sources)
        )
        again = f"; {used} rows of partly used batches read again" if used else ""
        return f"data: {per_source}{again}"

    def tokens_per_source(self) -> dict[str, int]:
        """Training tokens this rank has drawn from each source."""
        return {s.name: n * self.seq_len for s, n in zip(self.sources, self.sequences)}

    # ---- reading -----------------------------------------------------------------------
    def _rows(self, i: int, count: int) -> list[tuple[Batch, slice]]:
        """The next `count` rows of source i, as slices of its batches."""
        pieces = []
        while count > 0:
            if self._current[i] is None:  # a resumed source re-reads its batch and skips the rows already used
                if self._iters[i] is None:
                    self._iters[i] = iter(self.loaders[i])
                self._current[i] = next(self._iters[i])
            current = self._current[i]
            take = min(count, current.tokens.shape[0] - self._used[i])
            if take > 0:
                pieces.append((current, slice(self._used[i], self._used[i] + take)))
                self._used[i] += take
                count -= take
            if self._used[i] >= current.tokens.shape[0]:  # used up: the state before the next batch
                self._state_before[i], self._used[i], self._current[i] = self.loaders[i].state_dict(), 0, None
        return pieces

    def _gather(self, counts: np.ndarray) -> dict[str, np.ndarray]:
        """counts[i] next rows of each source i, sources in order; document ids made unique,
        stream ids of (source, worker).

        numpy rather than torch: on arrays this small, per-call overhead is the cost."""
        pieces = [
            (i, batch, rows) for i in np.flatnonzero(counts) for batch, rows in self._rows(int(i), int(counts[i]))
        ]
        out = {
            k: np.concatenate([getattr(b, k).numpy()[rows] for _, b, rows in pieces])
            for k in ("tokens", "targets", "doc_ids")
        }
        workers = self.loaders[0].workers
        out["streams"] = np.concatenate([i * workers + b.streams.numpy()[rows] for i, b, rows in pieces])
        if self._offsets_needed:
            docs = out["doc_ids"]
            offsets = np.repeat(self._doc_offsets, counts)[:, None]
            out["doc_ids"] = np.where(docs >= 0, docs + offsets, docs)
        return out

    def __iter__(self) -> Iterator[Batch]:
        try:
            yield from self._draw()
        finally:
            self._close_sources()

    def _close_sources(self) -> None:
        """End the sources' iterators (and their DataLoader workers) with this iterator, not when the
        collector gets to them: found in a reference cycle (the trainer's), a DataLoader iterator's
        queues are finalised before its shutdown, so its workers never got the word to stop and it
        joined each for 5 s, then, after SIGTERM (which they ignore: pretrain.slurm.ignore_stop_signals),
        5 s more. A source's position is that of the last batch handed out: a new iterator goes on
        from there, and the batch being read (`_current`) stays."""
        for i, source in enumerate(self._iters):
            if source is not None:
                self._iters[i] = None
                source.close()

    def _draw(self) -> Iterator[Batch]:
        n = len(self.loaders)
        while True:
            draws = np.searchsorted(self._cumulative, self._rng.random(self.batch_size), side="right")
            counts = np.bincount(draws, minlength=n)
            by_source = self._gather(counts)  # rows grouped by source, in draw order within each
            for i, c in enumerate(counts):
                self.sequences[i] += int(c)
            if n > 1:  # row r of the batch is the next row of source draws[r]: undo the grouping
                where = np.empty(self.batch_size, dtype=np.int64)
                where[np.argsort(draws, kind="stable")] = np.arange(self.batch_size)
                by_source = {k: v[where] for k, v in by_source.items()}
            yield Batch(**{k: torch.from_numpy(v) for k, v in by_source.items()})
