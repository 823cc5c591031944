"""The background sample's non-blocking copies from CUDA into pinned memory, against the CPU's reads and
writes of the same buffers (CUDA only: gpu_check's tests stage runs this file)."""

from __future__ import annotations

import pytest
import torch

from pretrain.slots.sample import BackgroundSample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="copies into pinned memory need CUDA")


def _batch(fill: int, rows: int = 4, seq_len: int = 256, heads: int = 4, k: int = 32):
    indices = torch.full((rows * seq_len, heads, k), fill, dtype=torch.int64, device="cuda")
    doc_ids = torch.full((rows, seq_len), fill, dtype=torch.int64, device="cuda")
    return indices, doc_ids


def _busy_stream() -> None:
    """Work ahead of the copies on the stream (~0.5 s of GPU time), so they are still in flight when the
    CPU reaches the next line."""
    torch.cuda._sleep(1_000_000_000)


def test_a_skipped_steps_undo_and_a_read_wait_for_the_copies_in_flight():
    sample = BackgroundSample(capacity=1, layer_names=["layers.2"], device="cpu")
    first = _batch(7)
    sample.begin_step()
    sample.offer(0, [first[0]], first[1])
    torch.cuda.synchronize()

    # a skipped step: its copy of entry 0 was still queued when the undo wrote the old entry back, and
    # landed after it, so the sample kept the skipped step's indices
    sample.begin_step()
    _busy_stream()
    second = _batch(9)
    sample.offer(0, [second[0]], second[1])
    sample.discard_step()
    torch.cuda.synchronize()
    kept = sample.data()
    assert torch.equal(kept.indices["layers.2"][0], first[0].cpu().to(torch.int32))
    assert torch.equal(kept.doc_ids[0], first[1].cpu())

    # a read (checkpoint, export) right after an offer sees the offered entry whole
    sample.begin_step()
    _busy_stream()
    sample.offer(0, [second[0]], second[1])
    read = sample.state_dict()
    assert torch.equal(read["sample.layers.2.indices"][0], second[0].cpu().to(torch.int32))
    assert torch.equal(read["sample.doc_ids"][0], second[1].cpu())
