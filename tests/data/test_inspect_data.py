"""tools/inspect_data.py: a split's numbers against the documents it was prepared from, the rows
decoded as the model reads them, and the warnings for text the tokenizer hardly covers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_helpers import SEQ_LEN
from pretrain.data import DataError, write_dataset
from pretrain.data.inspect import decoded_rows, inspect_split
from tools.inspect_data import main

pytestmark = pytest.mark.filterwarnings("ignore:--val-fraction=0")


def prepared(tmp_path, tokenizer, documents, name="ds"):
    out = tmp_path / name
    encoded = tokenizer.encode_batch(documents)
    write_dataset(encoded, out, tokenizer, SEQ_LEN, val_fraction=0.0, sequences_per_shard=8, rows_per_block=3,
                  show_progress=False)  # fmt: skip
    return out, encoded


def test_numbers_are_the_documents_own(tmp_path, tokenizer, documents):
    out, encoded = prepared(tmp_path, tokenizer, documents)
    report = inspect_split(out)
    lengths = np.array(sorted(len(e) + 1 for e in encoded))  # EOS ends every document
    assert sorted(report.document_lengths.tolist()) == lengths.tolist()
    assert report.documents == len(documents) and report.tokens == lengths.sum()
    assert report.sequences * (SEQ_LEN + 1) == report.tokens + report.padding and report.padding < SEQ_LEN + 1
    assert report.length_percentiles["max"] == lengths.max()
    assert report.length_percentiles["p50"] == pytest.approx(np.median(lengths))
    assert report.short_documents == int((lengths < 16).sum()) >= 1  # "Short."
    counts = {}
    for ids in encoded:
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    best = max(counts.values())
    assert report.top_tokens[0][1] == max(best, len(documents))  # EOS occurs once per document
    assert report.byte_fallback_share == 0.0 and report.warnings() == []


def test_document_lengths_over_many_blocks_equal_a_direct_count(tmp_path, tokenizer):
    """Thousands of documents across hundreds of blocks (the per-document counts grow many times),
    some documents spanning rows and blocks: every length, in order, is its document's own."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(4, tokenizer.vocab_size, rng.integers(1, 80)).tolist() for _ in range(3000)]
    write_dataset(docs, tmp_path / "many", tokenizer, SEQ_LEN, val_fraction=0.0, sequences_per_shard=64,
                  rows_per_block=2, show_progress=False)  # fmt: skip
    report = inspect_split(tmp_path / "many")
    assert report.document_lengths.tolist() == [len(d) + 1 for d in docs]  # + EOS
    assert report.documents == 3000 and report.sequences > 2 * 500


def test_rows_decode_to_the_documents_in_order(tmp_path, tokenizer, documents):
    out, _ = prepared(tmp_path, tokenizer, documents)
    rows = decoded_rows(out, rows=10**6, marker="|")  # all of them
    text = "".join(rows)
    decoded = [tokenizer.decode(tokenizer.encode(d)) for d in documents]
    # every document, in order, each once, across rows (a word cut at a row's end may lose its space)
    assert ["".join(d.split()) for d in text.split("|")[:-1]] == ["".join(d.split()) for d in decoded]
    assert rows[0].startswith(decoded[0][:40])


def test_text_the_tokenizer_hardly_covers_is_flagged(tmp_path, tokenizer):
    greek = ["Η γρήγορη καφέ αλεπού πηδά πάνω από τον τεμπέλη σκύλο. " * 4 for _ in range(12)]
    out, _ = prepared(tmp_path, tokenizer, greek, "greek")
    report = inspect_split(out)
    assert report.byte_fallback_share > 0.5
    assert "byte fallbacks: the tokenizer hardly covers this text" in report.warnings()[0]
    tiny, _ = prepared(tmp_path, tokenizer, ["a b"] * 30, "tiny")
    assert "30 of 30 documents are shorter than 16 tokens" in inspect_split(tiny).warnings()[0]


def test_cli_writes_json_and_plot_and_refuses_a_missing_split(tmp_path, tokenizer, documents, capsys):
    out, _ = prepared(tmp_path, tokenizer, documents)
    assert main([str(out), "--rows", "1", "--json", str(tmp_path / "r.json"), "--plot", str(tmp_path / "l.png")]) == 0
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["documents"] == len(documents) and len(payload["rows"]) == 1 and payload["warnings"] == []
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "--- row 0 ---" in capsys.readouterr().out
    assert main([str(out), "--split", "val"]) == 2  # it has one, empty (val_fraction=0)
    assert (
        f"{out}'s 'val' split is empty (prepared with --val-fraction 0.0): inspect 'train'" in capsys.readouterr().err
    )
    assert main([str(out), "--split", "test"]) == 2
    assert f"{out} has no 'test' split (it has ['train']): pass --split train" in capsys.readouterr().err
    with pytest.raises(DataError, match="does not exist"):
        inspect_split(tmp_path / "nowhere")


def test_plot_into_a_new_folder_and_a_folder_as_output_refused(tmp_path, tokenizer, documents, capsys):
    """--plot into a folder not yet made crashed (its temporary was written beside it without
    creating the folder); a folder as --plot crashed after the inspection, leaving a temporary
    beside the folder."""
    out, _ = prepared(tmp_path, tokenizer, documents)
    plot = tmp_path / "plots" / "lengths.png"
    assert main([str(out), "--rows", "0", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in plot.parent.iterdir()] == ["lengths.png"]  # no temporary left
    capsys.readouterr()
    for option in ("--plot", "--json"):
        with pytest.raises(SystemExit) as exit_:
            main([str(out), "--rows", "0", option, str(plot.parent)])
        assert exit_.value.code == 2
        assert f"argument {option}: {plot.parent} is a folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "plots"]


def test_a_plot_format_matplotlib_cannot_write_is_refused_before_the_inspection(tmp_path, monkeypatch, capsys):
    """--plot lengths.txt read every shard of the split and then ended in matplotlib's ValueError
    traceback ("Format 'txt' is not supported"), nothing plotted. It is refused when the arguments
    are parsed; a suffix matplotlib writes, or none (PNG), is taken."""
    import tools.inspect_data as cli

    def unread(*args, **kwargs):
        raise AssertionError("the split was read")

    monkeypatch.setattr(cli, "inspect_split", unread)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "ds"), "--plot", str(tmp_path / "lengths.txt")])
    assert exit_.value.code == 2
    assert "argument --plot: " in (err := capsys.readouterr().err) and "cannot write a .txt image; name a .png" in err
    from pretrain.cli import image_file

    for name in ("lengths.png", "lengths.PDF", "lengths.svg", "lengths"):
        assert image_file("lengths.png")(str(tmp_path / name)) == str(tmp_path / name)


def test_one_file_named_for_the_json_and_the_plot_is_refused_before_the_inspection(
    tmp_path, tokenizer, documents, capsys
):
    """--json x.png --plot x.png wrote the JSON, then the plot over it: the report was lost with
    no word. Refused when the arguments are parsed, the file untouched."""
    out = prepared(tmp_path, tokenizer, documents)
    both = tmp_path / "report.png"
    with pytest.raises(SystemExit) as exit_:
        main([str(out), "--json", str(both), "--plot", f"{tmp_path}/./report.png"])
    assert exit_.value.code == 2 and not both.exists()
    err = capsys.readouterr().err
    assert f"--json and --plot both name {tmp_path}/./report.png: the one written last would replace the other" in err


def test_inspecting_a_dataset_reads_its_shards_without_torch(tmp_path, tokenizer, documents, repo_root):
    """Reading a shard imported webdataset's tar iterator, and the webdataset package imports torch
    (~3 s of the tool's start, python -X importtime): memlayers-inspect-data, which reads every shard
    and needs no torch, paid it. The reference is sys.modules in a fresh interpreter after the tool ran."""
    import subprocess
    import sys

    out, _ = prepared(tmp_path, tokenizer, documents)
    script = (
        "import sys\n"
        "from tools.inspect_data import main\n"
        f"assert main([{str(out)!r}, '--rows', '1']) == 0\n"
        "print(sorted(m for m in ('torch', 'webdataset') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=repo_root, capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "[]"
    assert "train: " in done.stdout  # it did read the split
