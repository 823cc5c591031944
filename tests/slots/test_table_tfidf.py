"""Table file round trip, TF-IDF vs an independent float64 implementation, the tools."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pretrain.model import Transformer
from pretrain.model.names import slot_stream_names
from pretrain.slots import (
    SlotStatistics,
    TableMismatchError,
    check_table_matches,
    load_table,
    model_config_hash,
    rank_slots,
    save_table,
    tfidf_scores,
    tokenizer_hash,
)
from slot_streams import make_stream
from tools import slot_report
from tools import tfidf as tfidf_tool


def reference_tfidf(counts: list[int], df: list[int], num_docs: int) -> list[float]:
    total = math.fsum(counts)
    return [c / total * math.log((num_docs + 1) / (d + 1)) for c, d in zip(counts, df)]


def test_tfidf_matches_float64_reference():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(1, 300)
        num_docs = rng.randint(0, 10_000)
        counts = [rng.choice([0, 0, rng.randint(1, 10**6)]) for _ in range(n)]
        counts[rng.randrange(n)] += 1
        df = [rng.randint(0, num_docs) for _ in range(n)]
        got = tfidf_scores(torch.tensor(counts), torch.tensor(df), num_docs)
        assert got.dtype == torch.float64
        for g, w in zip(got.tolist(), reference_tfidf(counts, df, num_docs)):
            assert g == pytest.approx(w, rel=1e-12, abs=1e-300)
    with pytest.raises(ValueError, match="no slot accesses"):
        tfidf_scores(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 3)


def small_stats(num_slots: int = 16, names=("layers.1",)) -> SlotStatistics:
    stats = SlotStatistics(num_slots, list(names), granularity="document", sample_batches=2)
    for step, (idx, doc_ids) in enumerate(make_stream(0, 4, 2, 5, 2, 3, num_slots, len(names), 0, 7)):
        stats.update(idx, doc_ids)
        stats.end_step(step + 1)
        if step % 2:
            stats.reduce()
    return stats.reduce(close_interval=False)


def test_table_round_trip_and_validation(tmp_path):
    stats = small_stats()
    path = save_table(
        tmp_path / "t" / "slot_frequencies.safetensors",
        stats,
        {"model_config_hash": "abc", "tokenizer_hash": "def", "run": {"seed": 1}},
    )
    assert [p.name for p in path.parent.iterdir()] == ["slot_frequencies.safetensors"]  # no temp left
    table = load_table(tmp_path / "t")  # a directory works too
    assert torch.equal(table.counts["layers.1"], stats.counts["layers.1"])
    assert torch.equal(table.doc_freq["layers.1"], stats.doc_freq["layers.1"])
    assert (table.num_documents, table.num_tokens, table.step) == (stats.num_documents, stats.num_tokens, 4)
    assert table.granularity == "document" and table.metadata["model_config_hash"] == "abc"
    assert json.loads(table.metadata["run"]) == {"seed": 1}
    assert table.history["step"].tolist() == [2, 4]
    for key in ("interval_top1pct_share", "interval_kl_uniform"):
        saved = table.history[f"layers.1.{key}"]
        assert saved.dtype == torch.float64 and saved.tolist() == stats.history[f"layers.1.{key}"]
    assert torch.equal(table.sample.doc_ids, stats.sample_data().doc_ids)

    with pytest.raises(ValueError, match="reserved"):
        save_table(tmp_path / "x.safetensors", stats, {"num_documents": 3})
    bad = tmp_path / "bad.safetensors"
    save_file({"layers.1.counts": torch.zeros(16, dtype=torch.int64)}, str(bad), metadata={"format_version": "9"})
    with pytest.raises(ValueError, match="format_version"):
        load_table(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a table")
    with pytest.raises(ValueError, match="not a readable"):
        load_table(tmp_path / "junk.safetensors")


def _rewrite(src: Path, dst: Path, header=None, tensors=None, drop=()) -> Path:
    """A copy of the table at `src` with header keys replaced or dropped and tensors replaced."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = {**f.metadata(), **(header or {})}
        saved = {k: f.get_tensor(k) for k in f.keys()}
    for key in drop:
        meta.pop(key)
    save_file({**saved, **(tensors or {})}, str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize(
    "header,tensors,drop,names",
    [
        (None, None, ("layers",), "lacks ['layers']"),
        (None, None, ("num_documents", "step"), "lacks ['num_documents', 'step']"),
        ({"layers": "layers.1"}, None, (), "header 'layers' is 'layers.1'"),
        ({"layers": "[]"}, None, (), "header 'layers' is '[]'"),
        ({"num_documents": "-5"}, None, (), "header 'num_documents' is '-5'"),
        ({"num_slots": "0"}, None, (), "header 'num_slots' is '0'"),
        ({"granularity": "batch"}, None, (), "header 'granularity'"),
        (None, {"layers.1.doc_freq": "beyond"}, (), "'layers.1.doc_freq' holds values in"),
        (None, {"layers.1.counts": "negative"}, (), "'layers.1.counts' holds values in [-1,"),
    ],
)
def test_a_damaged_header_or_impossible_values_are_named(tmp_path, header, tensors, drop, names):
    """A table whose header lacks or garbles a key, or whose document frequencies exceed the units
    counted (idf < 0) or counts are negative, is refused naming the file and key (a KeyError, a bare
    JSON error, or NaN / negative TF-IDF scores before)."""
    stats = small_stats()
    good = save_table(tmp_path / "good.safetensors", stats)
    if tensors:
        df, counts = stats.doc_freq["layers.1"].clone(), stats.counts["layers.1"].clone()
        df[3], counts[5] = stats.num_documents + 1, -1
        tensors = {k: {"beyond": df, "negative": counts}[v] for k, v in tensors.items()}
    bad = _rewrite(good, tmp_path / "bad.safetensors", header, tensors, drop)
    with pytest.raises(ValueError) as err:
        load_table(bad)
    assert str(bad) in str(err.value) and names in str(err.value)
    assert load_table(good).num_documents == stats.num_documents
    assert 0 < int(stats.doc_freq["layers.1"].max()) <= stats.num_documents  # the real table is in range


def test_rank_slots_against_brute_force(make_model_config, tmp_path):
    torch.manual_seed(0)
    cfg = make_model_config()
    model = Transformer(cfg)
    n = cfg.memory.num_slots
    rng = random.Random(1)
    df = torch.tensor([rng.randint(0, 50) for _ in range(n)])
    stats = SlotStatistics(n, ["layers.1"])
    sd = stats.state_dict()
    sd["layers.1.doc_freq"], sd["totals"] = df, torch.tensor([50, 0])
    table = load_table(save_table(tmp_path / "t.safetensors", sd, {}))
    pad = 0
    tokens = torch.tensor([[5, 9, 12, 9, 33, pad, pad], [7, 7, 1, 2, 3, 4, pad]])
    ranked = rank_slots(model, tokens, table, "layers.1", top=1000, pad_id=pad)

    model(tokens)
    idx = model.layers[1].ffn.last_indices.reshape(tokens.numel(), -1).tolist()
    flat = tokens.reshape(-1).tolist()
    counts = Counter(s for t, row in zip(flat, idx) if t != pad for s in row)
    want = reference_tfidf([counts.get(i, 0) for i in range(n)], df.tolist(), 50)
    assert {r.slot for r in ranked} == set(counts)
    for r in ranked:
        assert r.score == pytest.approx(want[r.slot], rel=1e-12)
        assert r.tokens == [t for t, row in zip(flat, idx) if t != pad and r.slot in row]
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    top3 = rank_slots(model, tokens, table, "layers.1", top=3, pad_id=pad)
    assert len(top3) == 3 and top3.scoring == sum(1 for i in counts if want[i] > 0) > 3
    with pytest.raises(ValueError, match="not in the table"):
        rank_slots(model, tokens, table, "layers.0")


@pytest.fixture
def export_dir(tmp_path, make_model_config):
    spm = pytest.importorskip("sentencepiece")
    torch.manual_seed(0)
    cfg = make_model_config()
    model = Transformer(cfg)
    out = tmp_path / "export"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"model": dataclasses.asdict(cfg)}))
    sentences = ["the cat sat on the mat", "ada was born in paris", "where was ada born"] * 20
    model_io = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model_io,
        vocab_size=40,
        hard_vocab_limit=False,
        model_type="unigram",
    )
    (out / "tokenizer.model").write_bytes(model_io.getvalue())
    n = cfg.memory.num_slots
    stats = SlotStatistics(n, ["layers.1"])
    for idx, doc_ids in make_stream(0, 2, 2, 5, cfg.memory.heads, cfg.memory.k, n, 1, 0, 4):
        stats.update(idx, doc_ids)
    meta = {"model_config_hash": model_config_hash(cfg), "tokenizer_hash": tokenizer_hash(out / "tokenizer.model")}
    save_table(out / "slot_frequencies.safetensors", stats, meta)
    return out, cfg, stats, meta


def test_tfidf_tool_prints_ranking(export_dir, capsys):
    out, *_ = export_dir
    assert tfidf_tool.main(["--export", str(out), "--text", "where was ada born", "--top", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("# layers.1") and lines[1].startswith("rank")
    assert len(lines) == 2 + 5
    scores = [float(line.split("\t")[2]) for line in lines[2:]]
    assert scores == sorted(scores, reverse=True)


def _brute_force_tfidf(export_dir, text):
    """The tool's reading of `text` redone by hand: "<eos> tokens..." less the last token as inputs,
    each max_seq_len window through the model on its own, layers.1's picks counted, float64 TF-IDF."""
    import sentencepiece

    out, cfg, stats, _ = export_dir
    sp = sentencepiece.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    inputs = ([sp.eos_id()] + sp.encode(text))[:-1]
    model = Transformer(cfg)
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    model.eval()
    picks, tokens = [], []
    for start in range(0, len(inputs), cfg.max_seq_len):  # each window on its own
        window = inputs[start : start + cfg.max_seq_len]
        model(torch.tensor([window]))
        picks += model.layers[1].ffn.last_indices.reshape(len(window), -1).tolist()
        tokens += window
    counts = Counter(s for row in picks for s in row)
    want = reference_tfidf(
        [counts.get(i, 0) for i in range(cfg.memory.num_slots)],
        stats.doc_freq["layers.1"].tolist(),
        stats.num_documents,
    )
    return sp, inputs, tokens, picks, counts, want


def test_tfidf_tool_header_counts_every_slot_scoring_above_0_not_only_those_shown(export_dir, capsys):
    """The header line gives the number of slots scoring above 0, and says when --top shows fewer
    (it gave the number shown as that count: '20 slots scoring above 0' for 619 on the demo's export);
    against a brute-force count of the text's picks."""
    text = "where was ada born"
    *_, counts, want = _brute_force_tfidf(export_dir, text)
    scoring = sum(1 for i in counts if want[i] > 0)
    assert scoring > 3
    out = str(export_dir[0])
    assert tfidf_tool.main(["--export", out, "--text", text, "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"# layers.1: top 3 of {scoring} slots scoring above 0 (")
    assert len(lines) == 2 + 3
    assert tfidf_tool.main(["--export", out, "--text", text, "--top", str(scoring + 5)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith(f"# layers.1: {scoring} slots scoring above 0 (")
    assert len(lines) == 2 + scoring


def test_tfidf_tool_ranks_every_window_of_a_text_longer_than_the_context(export_dir, capsys):
    """A text of 2.5 contexts is ranked over all of it, in windows of max_seq_len (the tool kept
    only its last max_seq_len tokens before, without a word), read as sparse finetuning reads a
    document: "<eos> tokens...", every token but the last an input (the tool encoded the text
    without the <eos>, so its slots were not those SMF picks: 15 of the top 20 on a trained
    export); scores and tokens against a brute-force count of the windows' picks, in float64;
    slots scoring 0 are not listed."""
    out, cfg, _, _ = export_dir
    text = " ".join((["the cat sat on the mat", "ada was born in paris", "where was ada born"] * 2)[:5])
    sp, inputs, tokens, picks, counts, want = _brute_force_tfidf(export_dir, text)
    assert 2 * cfg.max_seq_len < len(inputs) < 3 * cfg.max_seq_len
    n = cfg.memory.num_slots

    assert tfidf_tool.main(["--export", str(out), "--text", text, "--top", str(n)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert f"the text's {len(inputs)} input tokens in 3 windows of {cfg.max_seq_len}" in lines[0]
    ranked = [line.split("\t") for line in lines[2:]]
    # every slot read with a score above 0; one read in every table unit (idf 0) carries no signal
    assert {int(r[1]) for r in ranked} == {i for i in counts if want[i] > 0}
    assert any(want[i] == 0 for i in counts)  # the case is met
    for _, slot, score, pieces in ranked:
        assert float(score) == pytest.approx(want[int(slot)], rel=1e-5)
        read = [t for t, row in zip(tokens, picks) if int(slot) in row]
        assert pieces == " ".join(sp.id_to_piece(t) for t in read)


def test_tfidf_tool_ranks_the_slots_sparse_finetuning_picks_for_the_text(export_dir, tmp_path, capsys):
    """The tool's top t are the rows SMF's selector (pretrain.smf.SlotSelector over a FinetuneSet
    of the same text) makes trainable at top_t = t."""
    from pretrain.data import Tokenizer
    from pretrain.smf import FinetuneSet, SlotSelector

    out, cfg, _, _ = export_dir
    text = "where was ada born"
    (tmp_path / "fact.txt").write_text(text + "\n")
    model = Transformer(cfg)
    model.load_state_dict(load_file(str(out / "model.safetensors")))
    model.eval()
    table = load_table(out / "slot_frequencies.safetensors")
    (batch,) = FinetuneSet([tmp_path / "fact.txt"], Tokenizer(out / "tokenizer.model"), cfg.max_seq_len).batches(8)
    model(batch.tokens)
    picked = SlotSelector(model, table, 10).select(batch.keep)[0].tolist()

    assert tfidf_tool.main(["--export", str(out), "--text", text, "--top", "10"]) == 0
    ranked = [int(line.split("\t")[1]) for line in capsys.readouterr().out.strip().splitlines()[2:]]
    assert len(picked) == 10 and sorted(ranked) == picked


def test_tfidf_tool_refuses_a_layer_it_cannot_rank(export_dir, capsys):
    out, *_ = export_dir
    assert tfidf_tool.main(["--export", str(out), "--text", "where was ada born", "--layer", "layers.9"]) == 2
    assert "--layer layers.9 cannot be ranked; choose one of ['layers.1']" in capsys.readouterr().err


def test_tfidf_tool_names_a_missing_export_or_table(export_dir, tmp_path, capsys):
    """A wrong --export is named as such (it was blamed on <dir>/slot_frequencies.safetensors),
    and an export without a table names the fix."""
    missing = tmp_path / "no_such_export"
    assert tfidf_tool.main(["--export", str(missing), "--text", "where was ada born"]) == 2
    err = capsys.readouterr().err
    assert f"no such export directory: {missing}" in err and "slot_frequencies" not in err
    out, *_ = export_dir
    (out / "slot_frequencies.safetensors").unlink()
    assert tfidf_tool.main(["--export", str(out), "--text", "where was ada born"]) == 2
    assert "holds no slot_frequencies.safetensors" in capsys.readouterr().err


def test_a_model_checkpoint_given_as_the_table_is_named_a_model_checkpoint(export_dir, tmp_path, capsys):
    """An export's model.safetensors passed where the slot table belongs was refused as
    "slot table format_version=None, ... (regenerate the table ...)": a wrong file, not an old table."""
    import tools.slot_report as slot_report_tool

    out, *_ = export_dir
    weights = out / "model.safetensors"
    assert tfidf_tool.main(["--export", str(out), "--text", "where was ada born", "--table", str(weights)]) == 2
    err = capsys.readouterr().err
    assert f"{weights} is a model checkpoint (weights, no slot counts), not a slot-frequency table" in err
    assert f"its table is {out / 'slot_frequencies.safetensors'}" in err and "format_version" not in err
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    alone.write_bytes(weights.read_bytes())
    assert slot_report_tool.main(["--table", str(alone), "--out", str(tmp_path / "report.png")]) == 2
    err = capsys.readouterr().err
    assert f"{alone} is a model checkpoint" in err and "slot_frequencies.safetensors of an export" in err
    assert not (tmp_path / "report.png").exists()


@pytest.mark.parametrize("wrong", ["model_config_hash", "tokenizer_hash"])
def test_tfidf_tool_refuses_table_from_other_model_or_tokenizer(export_dir, capsys, wrong):
    out, cfg, stats, meta = export_dir
    if wrong == "model_config_hash":
        other = dataclasses.replace(cfg, dim=cfg.dim * 2)
        meta = {**meta, wrong: model_config_hash(other)}
    else:
        meta = {**meta, wrong: tokenizer_hash(__file__)}
    save_table(out / "slot_frequencies.safetensors", stats, meta)
    assert tfidf_tool.main(["--export", str(out), "--text", "where was ada born"]) == 2
    err = capsys.readouterr().err
    assert "different " + ("model" if wrong == "model_config_hash" else "tokenizer") in err
    with pytest.raises(TableMismatchError):
        check_table_matches(load_table(out), cfg, out / "tokenizer.model")


@pytest.mark.parametrize("memory", [{"n_keys": 16}, {"layers": [0, 1]}])
def test_a_table_of_another_memory_shape_is_named_by_its_shape(export_dir, make_model_config, capsys, memory):
    """A table counted with another number of slots or other memory layers: the refusal says what
    differs (it named only two config hashes before)."""
    out, cfg, _, meta = export_dir
    other = make_model_config(memory=memory)
    stats = SlotStatistics(other.memory.num_slots, slot_stream_names(other.memory))
    save_table(out / "slot_frequencies.safetensors", stats, {**meta, "model_config_hash": model_config_hash(other)})
    assert tfidf_tool.main(["--export", str(out), "--text", "where was ada born"]) == 2
    err = capsys.readouterr().err
    want = f"counts {other.memory.num_slots} slots in {slot_stream_names(other.memory)} but the exported model's "
    assert want + f"memory has {cfg.memory.num_slots} slots in ['layers.1']" in err


def test_model_config_hash_ignores_execution_choices(make_model_config):
    a = make_model_config()
    assert model_config_hash(a) == model_config_hash(make_model_config(memory={"kernel": "torch", "parallel_size": 2}))
    assert model_config_hash(a) != model_config_hash(make_model_config(memory={"n_keys": 16}))


def test_slot_report_writes_png(tmp_path):
    save_table(tmp_path / "ckpt" / "step_4" / "slot_frequencies.safetensors", small_stats(), {})
    out = tmp_path / "report.png"
    assert slot_report.main(["--table", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert slot_report.main(["--table", str(tmp_path / "missing"), "--out", str(out)]) == 2
    # a dangling `latest` (its checkpoint deleted): the newest table found is read instead
    (tmp_path / "ckpt" / "latest").write_text("step_9")
    assert slot_report.main(["--table", str(tmp_path / "ckpt"), "--out", str(out)]) == 0


def test_slot_report_refuses_an_image_kind_matplotlib_cannot_write_before_reading(tmp_path, monkeypatch, capsys):
    """--out report.xyz read the table and drew the figure, then crashed in the save with
    matplotlib's "Format 'xyz' is not supported" traceback."""
    monkeypatch.setattr("pretrain.slots.table.load_table", lambda *a: pytest.fail("the table was read"))
    with pytest.raises(SystemExit) as exit_:
        slot_report.main(["--table", str(tmp_path), "--out", str(tmp_path / "report.xyz")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --out: " in err and "matplotlib cannot write a .xyz image" in err
    assert list(tmp_path.iterdir()) == []


def test_slot_report_makes_missing_folders_and_refuses_a_file_on_the_way(tmp_path, monkeypatch, capsys):
    """--out new/dir/x.png makes new/dir, as every tool's output does (pretrain.files.atomic_path).
    --out notes.txt/x.png read the table and drew the figure, then failed in the save with a bare
    FileExistsError traceback: refused at the parse now, nothing read or written."""
    save_table(tmp_path / "ckpt" / "slot_frequencies.safetensors", small_stats(), {})
    out = tmp_path / "new" / "dir" / "report.png"
    assert slot_report.main(["--table", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.setattr("pretrain.slots.table.load_table", lambda *a: pytest.fail("the table was read"))
    with pytest.raises(SystemExit) as exit_:
        slot_report.main(["--table", str(tmp_path / "ckpt"), "--out", str(tmp_path / "notes.txt" / "x" / "r.png")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"argument --out: {tmp_path / 'notes.txt' / 'x' / 'r.png'}: {tmp_path / 'notes.txt'} is a file" in err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_slot_report_names_the_steps_a_late_started_table_counts(tmp_path, monkeypatch):
    """A table whose counting began after step 2 (first_step 2): the counts panel says steps 3-4,
    not 'step 4' as if it counted the whole run."""
    import pretrain.slots.report as report

    stats = SlotStatistics(16, ["layers.1"])
    stats.start_at(2)
    for step, (idx, doc_ids) in enumerate(make_stream(0, 2, 2, 5, 2, 3, 16, 1, 0, 4), start=3):
        stats.update(idx, doc_ids)
        stats.end_step(step)
    table = load_table(save_table(tmp_path / "slot_frequencies.safetensors", stats.reduce(), {}))
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, out, dpi: figures.append(fig) or Path(out))
    report.render_report(table, tmp_path / "r.png")
    assert figures[0].axes[0].get_title() == "sorted slot counts (steps 3-4)"


def concentration_panel(tmp_path, monkeypatch):
    """The stats of two counters, and the report's third panel drawn from their table: its
    top-1% share axis and its KL axis."""
    import pretrain.slots.report as report

    stats = small_stats(names=("layers.1", "layers.3"))
    table = load_table(save_table(tmp_path / "slot_frequencies.safetensors", stats, {}))
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, out, dpi: figures.append(fig) or Path(out))
    report.render_report(table, tmp_path / "r.png")
    return stats, figures[0].axes[2], figures[0].axes[3]


def test_slot_report_plots_each_interval_s_top_1pct_share_and_kl(tmp_path, monkeypatch):
    """The report's third panel: the table's history of the top-1% share (left axis) and of the KL
    from uniform (right axis) per counter, over the history's steps."""
    stats, ax_top, ax_kl = concentration_panel(tmp_path, monkeypatch)
    for layer in ("layers.1", "layers.3"):
        (top,) = [line for line in ax_top.get_lines() if line.get_label() == f"{layer} top-1% share"]
        (kl,) = [line for line in ax_kl.get_lines() if line.get_label() == f"{layer} KL"]
        assert top.get_xdata().tolist() == kl.get_xdata().tolist() == [2, 4]
        assert top.get_ydata().tolist() == stats.history[f"{layer}.interval_top1pct_share"]
        assert kl.get_ydata().tolist() == stats.history[f"{layer}.interval_kl_uniform"]


def test_slot_report_concentration_legend_names_the_share_and_the_kl_lines(tmp_path, monkeypatch):
    """The third panel's one legend (on either of its two axes) names each counter's top-1% share
    line and its KL line, with the lines' own colours and styles."""
    _, ax_top, ax_kl = concentration_panel(tmp_path, monkeypatch)
    (legend,) = [ax.get_legend() for ax in (ax_top, ax_kl) if ax.get_legend() is not None]
    labels = [text.get_text() for text in legend.get_texts()]
    expected = ["layers.1 top-1% share", "layers.3 top-1% share", "layers.1 KL", "layers.3 KL"]
    assert labels == expected
    plotted = {line.get_label(): line for line in [*ax_top.get_lines(), *ax_kl.get_lines()]}
    for label, handle in zip(labels, legend.legend_handles, strict=True):
        assert handle.get_color() == plotted[label].get_color()
        assert handle.get_linestyle() == plotted[label].get_linestyle()


def test_slot_report_out_without_suffix_is_a_png_and_a_folder_is_refused(tmp_path, capsys):
    """matplotlib read the format from the temporary's name, whose suffix is its random tail
    when --out has none; a folder as --out crashed in the final rename."""
    save_table(tmp_path / "ckpt" / "slot_frequencies.safetensors", small_stats(), {})
    out = tmp_path / "plots" / "report"
    out.parent.mkdir()
    assert slot_report.main(["--table", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as exit_:
        slot_report.main(["--table", str(tmp_path / "ckpt"), "--out", str(out.parent)])
    assert exit_.value.code == 2 and "is a folder: name the file to write" in capsys.readouterr().err
    assert [p.name for p in out.parent.iterdir()] == ["report"]  # no temporary left


def _set_export_run(out, run_id: str) -> None:
    config = json.loads((out / "config.json").read_text())
    config["memlayers"] = {"run_id": run_id}
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("table_run", ["b" * 32, None])
def test_table_from_another_run_is_refused_unless_allowed(export_dir, capsys, tmp_path, table_run):
    """Same model config and tokenizer, another training run (e.g. another seed): the run ids differ
    (or the table has none), so both tools refuse it; --allow-other-run accepts it on purpose."""
    out, _cfg, stats, meta = export_dir
    _set_export_run(out, "a" * 32)
    save_table(
        out / "slot_frequencies.safetensors", stats, meta if table_run is None else {**meta, "run_id": table_run}
    )
    argv = ["--export", str(out), "--text", "where was ada born", "--top", "3"]
    assert tfidf_tool.main(argv) == 2
    assert "--allow-other-run" in capsys.readouterr().err
    assert tfidf_tool.main([*argv, "--allow-other-run"]) == 0
    from tools.smf_finetune import main as smf_main

    data = tmp_path / "facts.txt"
    data.write_text("ada was born in paris\n")
    assert smf_main(["--export", str(out), "--data", str(data), "--out", str(tmp_path / "ft")]) == 2
    assert "training run" in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()


def test_table_of_the_same_run_is_accepted(export_dir, capsys):
    out, _cfg, stats, meta = export_dir
    _set_export_run(out, "c" * 32)
    save_table(out / "slot_frequencies.safetensors", stats, {**meta, "run_id": "c" * 32})
    assert tfidf_tool.main(["--export", str(out), "--text", "where was ada born", "--top", "3"]) == 0


def test_top_tfidf_slots_never_picks_a_slot_without_signal():
    """A slot read in every background unit (df = |B|) has idf log(1) = 0: TF-IDF gives it score 0,
    no sign that it is specific to the batch, and SMF must not update it. With fewer than `top`
    slots scoring above 0 they were picked anyway (after the others). Against a brute force over
    random tables: the slots scoring above 0, best first, ties by slot."""
    from pretrain.slots import top_tfidf_slots

    gen = torch.Generator().manual_seed(5)
    for _ in range(50):
        n, units = 40, 6
        counts = torch.randint(0, 4, (n,), generator=gen) * (torch.rand(n, generator=gen) < 0.5)
        counts[0] = 1  # the batch reads something
        doc_freq = torch.where(
            torch.rand(n, generator=gen) < 0.5, units, torch.randint(0, units + 1, (n,), generator=gen)
        )
        total = float(counts.sum())
        scores = {
            i: int(counts[i]) / total * math.log((units + 1) / (int(doc_freq[i]) + 1)) for i in range(n) if counts[i]
        }
        signal = sorted((i for i, s in scores.items() if s > 0), key=lambda i: (-scores[i], i))
        for top in (1, 3, len(signal), len(signal) + 5, n):
            assert top_tfidf_slots(counts, doc_freq, units, top).tolist() == signal[:top]
    # every slot the batch reads is in every unit: nothing to update
    assert top_tfidf_slots(torch.tensor([2, 0, 1]), torch.tensor([4, 4, 4]), 4, 3).tolist() == []


def test_tfidf_tool_reads_the_text_from_a_file_or_stdin(export_dir, tmp_path, monkeypatch, capsys):
    """--text alone took the text on the command line (a paragraph had to be quoted into it); --file reads
    a file whole, `-` stdin, and ranks as --text of the same text does. A file that cannot be read is named."""
    out, *_ = export_dir
    text = "where was ada born\nthe cat sat on the mat\n"
    assert tfidf_tool.main(["--export", str(out), "--text", text, "--top", "7"]) == 0
    want = capsys.readouterr().out
    (tmp_path / "q.txt").write_text(text, encoding="utf-8")
    assert tfidf_tool.main(["--export", str(out), "--file", str(tmp_path / "q.txt"), "--top", "7"]) == 0
    assert capsys.readouterr().out == want
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    assert tfidf_tool.main(["--export", str(out), "--file", "-", "--top", "7"]) == 0
    assert capsys.readouterr().out == want
    assert tfidf_tool.main(["--export", str(out), "--file", str(tmp_path / "absent.txt")]) == 2
    assert capsys.readouterr().err == f"error: --file {tmp_path / 'absent.txt'}: No such file or directory\n"
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    assert tfidf_tool.main(["--export", str(out), "--file", str(tmp_path / "latin1.txt")]) == 2
    assert "is not UTF-8 text (byte 3" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one text or the other
        tfidf_tool.main(["--export", str(out), "--text", text, "--file", str(tmp_path / "q.txt")])


def test_slot_report_title_names_the_run_the_table_is_from(tmp_path, monkeypatch):
    """Every table is slot_frequencies.safetensors: the title named only that, so the reports of
    three seeds' runs read the same. It names the checkpoint folder now, counts with separators."""
    import pretrain.slots.report as report

    folder = tmp_path / "runs" / "seed=1" / "checkpoints" / "step_00000004"
    table = load_table(save_table(folder / "slot_frequencies.safetensors", small_stats(), {}))
    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, out, dpi: figures.append(fig) or Path(out))
    report.render_report(table, tmp_path / "r.png")
    title = figures[0]._suptitle.get_text()
    assert title.startswith(f"{folder}: {table.num_slots:,} slots, {table.num_tokens:,} tokens")
