"""The embedded default dataset: the fact world, tokenized and sharded once, then cached.

`prepare_embedded_dataset(data_cfg, seq_len)` returns a directory holding manifest.json,
tokenizer.model, probes.jsonl, new_facts.jsonl, train/*.tar and val/*.tar. The directory
name carries a hash of every parameter that shapes it; an existing directory whose
manifest records the same parameters is reused. A file lock lets several ranks call it
at once: one builds, the others wait and reuse.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
from pathlib import Path

from pretrain.data.errors import DataError
from pretrain.data.prepare import is_validation, write_dataset
from pretrain.data.shards import FORMAT, read_manifest
from pretrain.data.synthetic import build_fact_world, write_probes
from pretrain.data.tokenizer import train_tokenizer
from pretrain.files import discard, remove_dead_temporaries, temp_path_beside


def embedded_parameters(data_cfg, seq_len: int) -> dict:
    return {
        "kind": "embedded-fact-world",
        "layout": 2,  # raised when the same parameters shard differently, so older caches are rebuilt
        "format": FORMAT,
        "seq_len": seq_len,
        "vocab_size": data_cfg.vocab_size,
        "val_fraction": data_cfg.val_fraction,
        "min_shards": data_cfg.min_shards,
        "sequences_per_shard": data_cfg.sequences_per_shard,
        "synthetic": dataclasses.asdict(data_cfg.synthetic),
    }


def _matches(directory: Path, params: dict) -> bool:
    try:
        return read_manifest(directory).get("creation") == params
    except DataError:
        return False


def prepare_embedded_dataset(data_cfg, seq_len: int, show_progress: bool = True) -> Path:
    """Build (once) or reuse the embedded fact corpus; with `data_cfg.dir` set, check and return that."""
    if data_cfg.dir:
        manifest = read_manifest(data_cfg.dir)
        if manifest["seq_len"] != seq_len:
            raise DataError(
                f"data.dir={data_cfg.dir} was prepared with seq_len={manifest['seq_len']}, "
                f"but data.seq_len={seq_len}: set them equal or re-run tools/prepare_data.py"
            )
        return Path(data_cfg.dir)
    if data_cfg.val_fraction <= 0 or data_cfg.min_shards <= 0:
        raise DataError(
            f"data.val_fraction={data_cfg.val_fraction} and data.min_shards={data_cfg.min_shards} "
            "must be positive for the embedded corpus"
        )
    params = embedded_parameters(data_cfg, seq_len)
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(data_cfg.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"embedded-{key}"
    with open(cache / f".embedded-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # every temporary of `out` is made under this lock, so a dead writer's can go (a build
        # killed by SIGKILL or the OOM killer leaves its scratch folder, a live one holds the lock)
        remove_dead_temporaries(out)
        if _matches(out, params):
            return out
        _build(data_cfg, seq_len, params, out, show_progress)
    return out


def _rows_per_shard(rows: int, min_shards: int) -> int:
    """The most rows per shard that still cut `rows` into at least `min_shards` shards, or one
    row per shard when there are fewer rows (readers no longer need a shard each since the
    loader splits rows, 2026-12-06; the sizing stays so that cached corpora keep their layout).
    ceil(rows / min_shards) alone can give fewer (9 rows, 4 shards: 3 + 3 + 3): a shard of
    (rows - 1) // (min_shards - 1) rows is the largest that leaves rows over for the last one."""
    if min_shards == 1:
        return max(1, rows)
    return max(1, min(math.ceil(rows / min_shards), (rows - 1) // (min_shards - 1)))


def _build(data_cfg, seq_len: int, params: dict, out: Path, show_progress: bool) -> None:
    syn = data_cfg.synthetic
    world = build_fact_world(
        syn.num_entities, syn.docs_per_entity, syn.qa_docs_per_entity, syn.new_fact_fraction, syn.seed
    )
    # the scratch folder is named as `out`'s temporaries are, so that the next build removes it
    # if this process is killed (a name like `embedded-<random>` would pass for a dataset)
    tmp = temp_path_beside(out)
    tmp.mkdir()
    try:
        # sentencepiece's normalization, as the corpus was always built: single-line prose loses nothing
        # to it, and a rebuilt cache keeps the tokenizer (and ids) that runs were trained with
        tok = train_tokenizer(
            world.train_documents, tmp / "tokenizer.model", data_cfg.vocab_size, keep_whitespace=False
        )
        token_docs = tok.encode_batch(world.train_documents)
        tokens = {"train": 0, "val": 0}
        for doc_id, ids in enumerate(token_docs):
            tokens["val" if is_validation(doc_id, syn.seed, data_cfg.val_fraction) else "train"] += len(ids) + 1
        per_shard = {
            s: min(data_cfg.sequences_per_shard, _rows_per_shard(math.ceil(n / (seq_len + 1)), data_cfg.min_shards))
            for s, n in tokens.items()
        }
        write_probes(world.probes, tmp / "probes.jsonl")
        (tmp / "new_facts.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in world.new_fact_documents))
        write_dataset(
            token_docs,
            out,
            tok,
            seq_len,
            val_fraction=data_cfg.val_fraction,
            seed=syn.seed,
            sequences_per_shard=per_shard,
            rows_per_block=256,
            creation=params,
            extra_files={"probes.jsonl": tmp / "probes.jsonl", "new_facts.jsonl": tmp / "new_facts.jsonl"},
            show_progress=show_progress,
            overwrite=True,
        )
    finally:
        discard(tmp)
