"""SlotStatistics against brute-force Python: counts, doc freqs, totals, resume, summaries."""

from __future__ import annotations

import io
import math

import pytest
import torch

from pretrain.slots import SlotStatistics
from slot_streams import brute_force, make_stream

pytestmark = pytest.mark.usefixtures("counting_path")  # each test with both counting paths (conftest.py)

N, H, K, B, S, LAYERS = 16, 2, 3, 3, 8, 2
NAMES = ["layers.1", "layers.3"]


def run(stats: SlotStatistics, batches) -> None:
    for step, (idx, doc_ids) in enumerate(batches):
        stats.update(idx, doc_ids)
        stats.end_step(step + 1)


def check_against(stats: SlotStatistics, streams: dict, granularity: str) -> None:
    counts, doc_freq, num_units, tokens = brute_force(streams, granularity, N, LAYERS)
    assert stats.num_tokens == tokens
    assert stats.num_documents == num_units
    for layer, name in enumerate(NAMES):
        assert stats.counts[name].tolist() == counts[layer]
        assert stats.doc_freq[name].tolist() == doc_freq[layer]
        assert int(stats.counts[name].sum()) == tokens * H * K  # conservation
        assert int(stats.doc_freq[name].max()) <= stats.num_documents


@pytest.mark.parametrize("granularity", ["document", "sequence", "chunk:5"])
@pytest.mark.parametrize("max_doc_len", [3, 40])  # many short documents / documents spanning micro-batches
def test_single_stream_matches_brute_force(granularity, max_doc_len):
    batches = make_stream(1, 6, B, S, H, K, N, LAYERS, first_doc_id=10, max_doc_len=max_doc_len, pad_tail=5)
    stats = SlotStatistics(N, NAMES, granularity=granularity)
    run(stats, batches)
    check_against(stats, {"a": batches}, granularity)


def test_document_spanning_many_micro_batches_counts_once():
    idx = [torch.zeros(B * S, H, K, dtype=torch.int64) + torch.arange(K)]  # every token picks slots 0..K-1
    stats = SlotStatistics(N, ["m"], granularity="document")
    for _ in range(4):
        stats.update(idx, torch.full((B, S), 42))
    assert stats.num_documents == 1
    assert stats.doc_freq["m"].tolist() == [1] * K + [0] * (N - K)
    assert stats.counts["m"].tolist() == [4 * B * S * H] * K + [0] * (N - K)


def test_interleaved_worker_streams():
    """Micro-batches alternate between two contiguous streams (two DataLoader workers)."""
    a = make_stream(2, 4, B, S, H, K, N, LAYERS, first_doc_id=0, max_doc_len=30)
    b = make_stream(3, 4, B, S, H, K, N, LAYERS, first_doc_id=1000, max_doc_len=30)
    stats = SlotStatistics(N, NAMES, granularity="document", streams=2)
    run(stats, [x for pair in zip(a, b) for x in pair])
    check_against(stats, {"a": a, "b": b}, "document")


def _roundtrip(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("granularity", ["document", "chunk:3"])
def test_exact_resume(granularity):
    batches = make_stream(5, 8, B, S, H, K, N, LAYERS, first_doc_id=0, max_doc_len=30)
    kwargs = dict(granularity=granularity, sample_batches=3, seed=7, streams=2)

    straight = SlotStatistics(N, NAMES, **kwargs)
    for step, (idx, doc_ids) in enumerate(batches):
        straight.update(idx, doc_ids)
        straight.end_step(step)
        if step == 2:
            straight.reduce()

    first = SlotStatistics(N, NAMES, **kwargs)
    for step, (idx, doc_ids) in enumerate(batches[:4]):
        first.update(idx, doc_ids)
        first.end_step(step)
        if step == 2:
            first.reduce()
    resumed = SlotStatistics(N, NAMES, **kwargs)
    resumed.load_state_dict(_roundtrip(first.state_dict()))
    for step, (idx, doc_ids) in enumerate(batches[4:], start=4):
        resumed.update(idx, doc_ids)
        resumed.end_step(step)

    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and a["meta"] == b["meta"]
    for key in a:
        if key != "meta":
            assert torch.equal(a[key], b[key]), key
    assert "sample.doc_ids" in a


def test_resume_refuses_other_config():
    sd = SlotStatistics(N, NAMES, granularity="document").state_dict()
    with pytest.raises(ValueError, match="granularity"):
        SlotStatistics(N, NAMES, granularity="sequence").load_state_dict(sd)
    with pytest.raises(ValueError, match="num_slots"):
        SlotStatistics(2 * N, NAMES).load_state_dict(sd)


def test_summary_against_float64_formulas():
    stats = SlotStatistics(200, ["m"], granularity="sequence")
    picks = torch.tensor([0] * 50 + [1] * 30 + [2] * 10 + [3] * 10)  # 100 picks over 4 slots
    stats.update([picks.view(100, 1, 1)], torch.zeros(1, 100, dtype=torch.int64))
    half = stats.reduce()  # interval ends here
    stats.update([torch.full((100, 1, 1), 5)], torch.zeros(1, 100, dtype=torch.int64))
    s = stats.reduce().summary()
    p = [50 / 200, 30 / 200, 10 / 200, 10 / 200, 100 / 200]
    entropy = -sum(x * math.log(x) for x in p)
    assert s["slots/m/used_fraction"] == pytest.approx(5 / 200)
    assert s["slots/m/entropy"] == pytest.approx(entropy, rel=1e-12)
    assert s["slots/m/kl_uniform"] == pytest.approx(math.log(200) - entropy, rel=1e-12)
    assert s["slots/m/top1pct_share"] == pytest.approx(150 / 200)  # top ceil(2) slots: 100 + 50
    assert s["slots/m/interval/used_fraction"] == pytest.approx(1 / 200)
    assert s["slots/m/interval/entropy"] == pytest.approx(0.0, abs=1e-15)
    assert half.summary()["slots/m/interval/used_fraction"] == pytest.approx(4 / 200)
    assert stats.history["m.used"] == [4, 5] and stats.history["m.interval_used"] == [4, 1]
    # the intervals' concentration: the top ceil(2) slots took 80 of the first 100 picks, all of the second
    first = [0.5, 0.3, 0.1, 0.1]
    assert stats.history["m.interval_top1pct_share"] == pytest.approx([0.8, 1.0], rel=1e-12)
    kl_first = math.fsum(p * math.log(p * 200) for p in first)
    assert stats.history["m.interval_kl_uniform"] == pytest.approx([kl_first, math.log(200)], rel=1e-12)
    hist = stats.histograms()["slots/m/log10_count"]
    assert hist[0].item() == pytest.approx(math.log10(51)) and hist[199].item() == 0.0


def test_a_slot_log_summarises_each_interval_once(monkeypatch):
    """The trainer's slot log (reduce, summary, console lines) takes each counter's interval
    distribution (a top-k and a log over all N slots) once, and the cumulative one once: 2 per
    counter, not 3 (reduce's history and summary each took the interval's). Its scalars equal
    those of the distribution taken afresh."""
    import pretrain.slots.counters as counters
    from pretrain.progress_log import log_slot_statistics
    from pretrain.slots.summary import distribution_summary

    stats = SlotStatistics(200, ["m", "n"], granularity="sequence")
    picks = torch.tensor([0] * 50 + [1] * 30 + [2] * 10 + [3] * 10).view(100, 1, 1)
    stats.update([picks, picks + 7], torch.zeros(1, 100, dtype=torch.int64))
    stats.reduce()  # a first interval closed: the next one starts from these counts
    stats.update([picks + 1, picks], torch.zeros(1, 100, dtype=torch.int64))
    expected = {n: distribution_summary(stats.counts[n] - stats.interval_start[n]) for n in ("m", "n")}
    calls = []
    monkeypatch.setattr(counters, "distribution_summary", lambda c: calls.append(1) or distribution_summary(c))
    logged = {}

    class Metrics:
        def scalars(self, values, step):
            logged.update(values)

        def line(self, text):
            pass

        def histogram(self, *args):
            pass

    log_slot_statistics(stats, Metrics(), step=2)
    assert len(calls) == 4
    for n in ("m", "n"):
        assert {k: logged[f"slots/{n}/interval/{k}"] for k in expected[n]} == expected[n]


def test_bad_input_is_refused():
    stats = SlotStatistics(N, NAMES)
    idx = [torch.zeros(B * S, H, K, dtype=torch.int64)] * 2
    with pytest.raises(ValueError, match="expected 2"):
        stats.update(idx[:1], torch.zeros(B, S, dtype=torch.int64))
    with pytest.raises(ValueError, match="shape"):
        stats.update(idx, torch.zeros(B, S + 1, dtype=torch.int64))
    with pytest.raises(ValueError, match="slots.granularity"):
        SlotStatistics(N, NAMES, granularity="chunk:0")
    with pytest.raises(RuntimeError, match="reduced copy"):
        stats.reduce(close_interval=False).update(idx, torch.zeros(B, S, dtype=torch.int64))


def test_a_state_saved_before_the_concentration_history_resumes_with_nan_there():
    """Checkpoints written before the top-1% share and KL were recorded hold only step, used and
    interval_used: those resume, the new series NaN at their points, and the table is written."""
    stats = SlotStatistics(200, ["m"], granularity="sequence")
    stats.update([torch.zeros(100, 1, 1, dtype=torch.int64)], torch.zeros(1, 100, dtype=torch.int64))
    stats.end_step(1)
    stats.reduce()
    sd = stats.state_dict()
    for key in ("m.interval_top1pct_share", "m.interval_kl_uniform"):
        del sd["meta"]["history"][key]
    resumed = SlotStatistics(200, ["m"], granularity="sequence")
    resumed.load_state_dict(sd)
    resumed.update([torch.arange(100).view(100, 1, 1)], torch.zeros(1, 100, dtype=torch.int64))
    resumed.end_step(2)
    history = resumed.reduce().history
    assert history["step"] == [1, 2] and history["m.interval_used"] == [1, 100]
    assert math.isnan(history["m.interval_top1pct_share"][0]) and history["m.interval_top1pct_share"][1] == 0.02
    assert math.isnan(history["m.interval_kl_uniform"][0])
    assert history["m.interval_kl_uniform"][1] == pytest.approx(math.log(2), rel=1e-12)  # 100 of 200 slots, evenly


def test_a_late_start_is_kept_through_a_checkpoint(tmp_path):
    """start_at(4): the first interval is steps 5.., the state and the table carry first_step 4,
    and a resumed copy keeps it."""
    from pretrain.slots import load_table, save_table

    stats = SlotStatistics(N, NAMES)
    stats.start_at(4)
    batches = make_stream(0, 2, B, S, H, K, N, LAYERS, 0, 5)
    for step, (idx, doc_ids) in enumerate(batches, start=5):
        stats.update(idx, doc_ids)
        stats.end_step(step)
    resumed = SlotStatistics(N, NAMES)
    resumed.load_state_dict(stats.state_dict())
    assert resumed.first_step == 4 and resumed.reduce().last_interval() == (5, 6)
    assert load_table(save_table(tmp_path / "t.safetensors", stats.reduce())).metadata["first_step"] == "4"
    with pytest.raises(RuntimeError, match="before the first update"):
        stats.start_at(7)
