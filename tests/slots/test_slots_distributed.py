"""Two gloo ranks on 127.0.0.1: reduce() sums counts and doc freqs and gathers the background samples."""

from __future__ import annotations

import os

import torch

from pretrain.slots import SlotStatistics, load_table, save_table
from pretrain.spawn import run_gloo
from slot_streams import brute_force, make_stream

N, H, K, B, S, LAYERS = 16, 2, 3, 3, 8, 2
NAMES = ["layers.0", "layers.2"]


def stream_of(rank: int):
    return make_stream(20 + rank, 5, B, S, H, K, N, LAYERS, first_doc_id=10_000 * rank, max_doc_len=30, pad_tail=2)


def _worker(rank: int, world: int, out_dir: str) -> None:
    # data parallel (P = 1): each rank counts its own tokens
    dp = SlotStatistics(N, NAMES, granularity="document", sample_batches=2, seed=3)
    for step, (idx, doc_ids) in enumerate(stream_of(rank)):
        dp.update(idx, doc_ids)
        dp.end_step(step + 1)
    reduced = dp.reduce()
    if rank == 0:
        save_table(os.path.join(out_dir, "dp.safetensors"), reduced, {"model_config_hash": "x"})


def test_two_rank_reduce(tmp_path):
    run_gloo(_worker, 2, str(tmp_path))

    dp = load_table(tmp_path / "dp.safetensors")
    streams = {"r0": stream_of(0), "r1": stream_of(1)}
    counts, doc_freq, num_docs, tokens = brute_force(streams, "document", N, LAYERS)
    assert dp.num_tokens == tokens and dp.num_documents == num_docs
    for layer, name in enumerate(NAMES):
        assert dp.counts[name].tolist() == counts[layer]
        assert dp.doc_freq[name].tolist() == doc_freq[layer]
        assert int(dp.counts[name].sum()) == tokens * H * K
        assert int(dp.doc_freq[name].max()) <= dp.num_documents
    assert dp.step == 5 and dp.history["step"].tolist() == [5]
    # both ranks sampled the same micro-batch indices: the gathered sample holds 2 x 2 entries
    assert len(dp.sample.batch_index) == 4
    assert sorted(dp.sample.batch_index.tolist()[:2]) == sorted(dp.sample.batch_index.tolist()[2:])
    for j, item in enumerate(dp.sample.batch_index.tolist()):
        assert torch.equal(dp.sample.doc_ids[j], streams[f"r{j // 2}"][item][1])


def _resumed_worker(rank: int, world: int, out_dir: str) -> None:
    """1 -> 2 ranks with train.micro_batch 3 -> 2: rank 0 keeps the old 3-row sample, rank 1 starts one of 2 rows."""
    old = SlotStatistics(N, NAMES, granularity="document", sample_batches=2, seed=3)
    for idx, doc_ids in stream_of(0):
        old.update(idx, doc_ids)
    stats = SlotStatistics(N, NAMES, granularity="document", sample_batches=2, seed=3)
    stats.load_resharded([old.state_dict()])
    for idx, doc_ids in resumed_stream(rank):
        stats.update(idx, doc_ids)
    reduced = stats.reduce()  # gathered the samples: raised on rows 3 vs 2
    if rank == 0:
        save_table(os.path.join(out_dir, "resumed.safetensors"), reduced, {})


def resumed_stream(rank: int):
    return make_stream(40 + rank, 30, 2, S, H, K, N, LAYERS, first_doc_id=50_000 + 10_000 * rank, max_doc_len=30)


def test_samples_of_other_micro_batch_sizes_are_gathered(tmp_path):
    run_gloo(_resumed_worker, 2, str(tmp_path))
    sample = load_table(tmp_path / "resumed.safetensors").sample
    assert sample.doc_ids.shape[1:] == (B, S) and len(sample.batch_index) == 4
    # rank 0's entries first, then rank 1's; each entry is its micro-batch, padded with rows of doc id -1
    old = stream_of(0)
    for j, item in enumerate(sample.batch_index.tolist()):
        idx, doc_ids = old[item] if j < 2 and item < len(old) else resumed_stream(j // 2)[item - len(old)]
        rows = doc_ids.shape[0]
        assert torch.equal(sample.doc_ids[j, :rows], doc_ids) and bool((sample.doc_ids[j, rows:] == -1).all())
        for layer, name in enumerate(NAMES):
            assert torch.equal(sample.indices[name][j, : rows * S].long(), idx[layer])
