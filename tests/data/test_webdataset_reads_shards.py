"""The shards are webdataset's layout (docs/data.md): the webdataset package, reading them as any
webdataset pipeline would, yields every block this project's own reader yields, byte for byte, in
the same order. The project reads and writes them itself (exact mid-epoch resume); this keeps the
files usable by other tools."""

from __future__ import annotations

import json

import numpy as np
import pytest
import webdataset  # a dev dependency (pyproject's [dev] extra), never imported by the project itself

from pretrain.data.shards import ShardWriter, read_blocks


@pytest.mark.parametrize("token_dtype,vocab", [("uint16", 50_000), ("uint32", 70_000)])
def test_webdataset_reads_every_block_of_every_shard_as_ours_does(tmp_path, token_dtype, vocab):
    seq_len, eos = 15, 1
    writer = ShardWriter(tmp_path, "train", seq_len, eos, token_dtype, sequences_per_shard=7, rows_per_block=3)
    rng = np.random.default_rng(0)
    for _ in range(40):
        writer.add(rng.integers(2, vocab, size=int(rng.integers(1, 60))))
    split = writer.close()
    assert len(split["shards"]) > 2  # several shards, several blocks each, a short last block

    width, dtype = seq_len + 1, np.dtype(token_dtype).newbyteorder("<")
    for shard in split["shards"]:
        path = tmp_path / shard["path"]
        ours = list(read_blocks(path, width, token_dtype, shard["sequences"], sha256=shard["sha256"], vocab_size=vocab))
        samples = list(webdataset.WebDataset(str(path), shardshuffle=False))
        assert [s["__key__"] for s in samples] == [f"{i:06d}" for i in range(len(ours))]
        for (tokens, meta), sample in zip(ours, samples):
            assert json.loads(sample["json"])["rows"] == len(tokens)
            theirs_tokens = np.frombuffer(sample["tokens"], dtype=dtype).reshape(-1, width)
            theirs_meta = np.frombuffer(sample["meta"], dtype="<i8").reshape(-1, 2)
            np.testing.assert_array_equal(theirs_tokens.astype(np.int64), tokens)
            np.testing.assert_array_equal(theirs_meta, meta)
        assert sum(len(t) for t, _ in ours) == shard["sequences"]
