"""Streaming, exactly resumable batches from prepared shards.

Work split: every epoch the split's shards are permuted by (seed, epoch); consumer
c = rank * W + worker (W = max(1, num_workers)) reads shards perm[c::world_size * W],
so ranks and DataLoader workers never share a shard and together read every shard once.

Position: each consumer's place is (epoch, shard index in its list, row in that shard,
rows already emitted from the window starting there). A window is the next
`shuffle_buffer` rows (permuted by (seed, epoch, consumer, window start)) or, without
shuffling, the next `batch_size` rows. Every batch carries its consumer's position after
it; the main process keeps the positions of the batches it has handed out, plus which
worker the DataLoader's round robin asks next, so `state_dict()` is a few integers per
worker and a rebuilt loader continues with exactly the same batches.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pretrain.data.errors import DataError
from pretrain.data.shards import CorruptShardError, read_blocks, read_manifest, row_doc_ids
from pretrain.data.tokenizer import Tokenizer

IGNORE_INDEX = -100
STATE_VERSION = 1


@dataclass
class Batch:
    tokens: torch.Tensor  # (B, seq_len) int64
    targets: torch.Tensor  # (B, seq_len) int64, IGNORE_INDEX where the target is padding
    doc_ids: torch.Tensor  # (B, seq_len) int64 document id of each input token, -1 on padding


def load_tokenizer(dataset_dir: str | Path) -> Tokenizer:
    """The dataset's tokenizer.model, checked against the manifest's hash."""
    manifest = read_manifest(dataset_dir)
    tok = Tokenizer(Path(dataset_dir) / "tokenizer.model")
    check_tokenizer(manifest, tok, Path(dataset_dir))
    return tok


def check_tokenizer(manifest: dict, tok: Tokenizer, dataset_dir: Path) -> None:
    if tok.sha256 != manifest.get("tokenizer_sha256"):
        raise DataError(
            f"tokenizer {tok.path} (sha256 {tok.sha256[:12]}) differs from the one {dataset_dir}/manifest.json "
            f"was built with (sha256 {str(manifest.get('tokenizer_sha256'))[:12]}): use the dataset's "
            "tokenizer.model or re-run tools/prepare_data.py with this tokenizer"
        )


class _Cursor:
    """Reads rows of one consumer's shard list from (shard i, row j) onwards."""

    def __init__(self, loader: "ShardLoader", shards: list[dict], i: int, j: int, stats: dict):
        self.loader, self.shards, self.stats = loader, shards, stats
        self.i, self.j = i, j
        self._blocks = None
        self._tok = self._meta = None
        self._off = 0
        if self.i < len(self.shards):
            self._open(skip=j)

    def _open(self, skip: int) -> None:
        shard = self.shards[self.i]
        self._blocks = read_blocks(
            self.loader.root / shard["path"],
            self.loader.width,
            self.loader.token_dtype,
            shard["sequences"],
            sha256=shard.get("sha256"),
            vocab_size=self.loader.vocab_size,
        )
        self._tok = None
        while skip > 0:
            if not self._next_block():
                return
            n = len(self._tok)
            if skip < n:
                self._off = skip
                return
            skip -= n
            self._tok = None

    def _next_block(self) -> bool:
        """Load the next block of shard i; on its end or a skipped corruption move to shard i+1."""
        try:
            self._tok, self._meta = next(self._blocks)
            self._off = 0
            return True
        except StopIteration:
            pass
        except CorruptShardError as err:
            if self.loader.on_corrupt == "error":
                raise
            self.stats["corrupt_shards_skipped"] = self.stats.get("corrupt_shards_skipped", 0) + 1
            warnings.warn(f"skipping the rest of a shard (data.on_corrupt=skip): {err}", stacklevel=2)
        self._blocks = None
        self._tok = None
        self.i, self.j = self.i + 1, 0
        if self.i < len(self.shards):
            self._open(skip=0)
        return False

    def position(self) -> tuple[int, int]:
        if self.i < len(self.shards) and self.j >= self.shards[self.i]["sequences"]:
            return self.i + 1, 0
        return self.i, self.j

    def take(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        toks, metas, n = [], [], 0
        while n < k and self.i < len(self.shards):
            if self._tok is None or self._off >= len(self._tok):
                self._next_block()
                continue
            t = min(k - n, len(self._tok) - self._off)
            toks.append(self._tok[self._off : self._off + t])
            metas.append(self._meta[self._off : self._off + t])
            self._off += t
            self.j += t
            n += t
        if not toks:
            return np.empty((0, self.loader.width), np.int64), np.empty((0, 2), np.int64)
        return np.concatenate(toks), np.concatenate(metas)


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
        if on_corrupt not in ("error", "skip"):
            raise DataError(f"data.on_corrupt={on_corrupt!r} must be 'error' or 'skip'")
        own_tok = self.root / "tokenizer.model"
        if own_tok.is_file():
            check_tokenizer(manifest, Tokenizer(own_tok), self.root)
        if tokenizer is not None:
            check_tokenizer(manifest, tokenizer, self.root)
        self.shards = manifest["splits"][split]["shards"]
        self.doc_id_offset = manifest["splits"][split]["doc_id_offset"]
        self.workers = max(1, num_workers)
        consumers = world_size * self.workers
        if len(self.shards) < consumers:
            raise DataError(
                f"split {split!r} of {self.root} has {len(self.shards)} shards but {world_size} ranks x "
                f"{self.workers} workers = {consumers} readers need at least one each: lower data.num_workers, "
                f"or re-run tools/prepare_data.py with a smaller --sequences-per-shard"
            )
        self.split, self.batch_size, self.seq_len = split, batch_size, manifest["seq_len"]
        self.width, self.token_dtype, self.eos_id = manifest["seq_len"] + 1, manifest["token_dtype"], manifest["eos_id"]
        self.vocab_size = manifest["vocab_size"]
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.seed, self.shuffle_buffer, self.on_corrupt, self.loop = seed, shuffle_buffer, on_corrupt, loop
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
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r} is not {STATE_VERSION}")
        mine, theirs = self._settings(), state.get("settings", {})
        diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
        if diff:
            raise DataError(
                "the saved loader state was made with other settings (saved, now): "
                + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items())
                + "; resume with the same data, batch size, ranks, workers, seed and shuffle_buffer"
            )
        self._positions = [list(map(int, p)) for p in state["positions"]]
        self._next_worker = int(state["next_worker"])
        self._worker_stats = [dict(s) for s in state["worker_stats"]]
        self._batches = int(state["batches"])

    # ---- reading -----------------------------------------------------------------------
    def _epoch_shards(self, consumer: int, epoch: int) -> list[dict]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [self.shards[k] for k in order[consumer :: self.world_size * self.workers]]

    def _make_batch(self, pieces: list[tuple[np.ndarray, np.ndarray]]) -> dict:
        rows = np.concatenate([p[0] for p in pieces])
        meta = np.concatenate([p[1] for p in pieces])
        docs = row_doc_ids(rows, meta[:, 0] + self.doc_id_offset, meta[:, 1], self.eos_id)
        targets = rows[:, 1:].copy()
        targets[docs[:, 1:] < 0] = IGNORE_INDEX
        return {
            "tokens": torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),
            "targets": torch.from_numpy(targets),
            "doc_ids": torch.from_numpy(np.ascontiguousarray(docs[:, :-1])),
        }

    def _stream(self, worker: int, pos: list[int], stats: dict) -> Iterator[tuple[dict, list[int]]]:
        """Batches of one consumer from `pos`, each with the consumer's position after it."""
        consumer = self.rank * self.workers + worker
        epoch, i, j, skip = pos
        pieces, have = [], 0
        while True:
            shards = self._epoch_shards(consumer, epoch)
            from_start = (i, j, skip) == (0, 0, 0)
            cursor = _Cursor(self, shards, i, j, stats)
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
                        yield self._make_batch(pieces), after
                        pieces, have = [], 0
            if not self.loop:
                if have:
                    yield self._make_batch(pieces), [epoch, len(shards), 0, 0]
                return
            if rows_this_epoch == 0 and from_start:
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
            dl = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, persistent_workers=False)
            for item in dl:
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
        for arrays, after in self.loader._stream(worker, self.positions[worker], stats):
            arrays.update(worker=worker, position=after, stats=dict(stats))
            yield arrays
