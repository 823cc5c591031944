"""Full finetuning and LoRA baselines, the finetuned export, and the finetuning set."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from pretrain.data import Tokenizer
from pretrain.export import ExportError, load
from pretrain.slots import load_table
from pretrain.smf import FinetuneSet, build_method, finetune, save_finetuned_export
from pretrain.smf.dataset import collate
from pretrain.smf.methods import LORA_TARGETS


@pytest.fixture
def data(smf_export):
    export, dataset = smf_export
    return FinetuneSet([dataset / "new_facts.jsonl"], Tokenizer(export / "tokenizer.model"), 32)


def probe_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(3))


def test_full_finetuning_moves_every_trained_weight(smf_export, data):
    export, _ = smf_export
    model = load(export)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method("full", model, lr=1e-3)
    for batch in data.batches(4):
        method.step(batch)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.1.ffn.keys1"} <= changed


@pytest.mark.parametrize("name", ["full", "lora"])
def test_baselines_take_the_weight_decay_they_are_given(smf_export, name):
    """build_method's weight_decay reaches the AdamW of both baselines (LoRA's was dropped)."""
    export, _ = smf_export
    method = build_method(name, load(export), lr=1e-3, lora_rank=4, weight_decay=0.25)
    assert [g["weight_decay"] for g in method.optimizer.param_groups] == [0.25]


def test_lora_trains_adapters_only_and_merges_exactly(smf_export, data, tmp_path):
    export, _ = smf_export
    model = load(export)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = build_method("lora", model, lr=1e-2, lora_rank=4)
    batches = list(data.batches(4))
    for batch in batches[:3]:
        method.step(batch)
    tokens = probe_tokens(model.cfg.vocab_size)
    with torch.no_grad():
        adapted = method.model(tokens)
    merged = method.finished_model()
    assert type(merged).__name__ == "Transformer"
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens), adapted, rtol=1e-5, atol=1e-5)
    after = merged.state_dict()
    assert set(after) == set(before)
    for key in before:
        targeted = key.rsplit(".", 2)[-2] in LORA_TARGETS
        assert torch.equal(before[key], after[key]) != targeted, key  # exactly the targeted projections move

    out = save_finetuned_export(export, merged, tmp_path / "lora", {"method": "lora", "lora_rank": 4})
    reloaded = load(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens), adapted, rtol=1e-5, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["memlayers"]["finetune"]["method"] == "lora"
    assert (out / "slot_frequencies.safetensors").read_bytes() == (export / "slot_frequencies.safetensors").read_bytes()

    def step_of(folder):  # what train.init_from logs as "exported at step"
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            return f.metadata()["step"]

    assert step_of(out) == step_of(export)


def test_finetuned_export_refuses_to_overwrite(smf_export, tmp_path):
    export, _ = smf_export
    model = load(export)
    with pytest.raises(ExportError, match="source export"):
        save_finetuned_export(export, model, export, {})
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        save_finetuned_export(export, model, tmp_path / "taken", {})
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_finetune_loop_records_every_epoch(smf_export, data):
    export, _ = smf_export
    model = load(export)
    method = build_method("sparse", model, lr=1.0, table=load_table(export), top_t=8)
    calls = []
    history = finetune(method, data, epochs=2, batch_size=8, evaluate=lambda m: calls.append(m) or {"x": 1.0}, log=None)
    steps_per_epoch = -(-len(data) // 8)
    assert [h["steps"] for h in history] == [steps_per_epoch, 2 * steps_per_epoch]
    assert len(calls) == 2 and all(h["x"] == 1.0 for h in history)
    assert method.rows_updated <= 8 * 2 * steps_per_epoch
    calls.clear()
    history = finetune(
        method, data, epochs=3, batch_size=8, evaluate=lambda m: calls.append(m) or {"x": 1.0}, log=None, eval_every=2
    )
    assert ["x" in h for h in history] == [False, True, True]  # every 2nd epoch and the last


def test_finetune_set_windows_cover_every_token_once(tmp_path, smf_export):
    export, _ = smf_export
    tok = Tokenizer(export / "tokenizer.model")
    long_text = " ".join(["Ada was born in Aldmere."] * 40)
    (tmp_path / "ft.jsonl").write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "Hi."}) + "\n")
    data = FinetuneSet([tmp_path / "ft.jsonl"], tok, max_seq_len=16)
    ids = [tok.eos_id] + tok.encode(long_text)
    windows = data.rows[:-1]
    assert all(len(w) <= 17 for w in data.rows)
    # consecutive windows overlap by one token: concatenating their targets gives the document
    assert sum((w[1:] for w in windows), []) == ids[1:]
    assert data.num_tokens == len(ids) - 1 + len(data.rows[-1]) - 1
    batch = collate([[1, 2, 3], [4, 5]])
    assert batch.tokens.tolist() == [[1, 2], [4, 0]]
    assert batch.targets.tolist() == [[2, 3], [5, -100]]
    assert batch.keep.tolist() == [[True, True], [True, False]]


def test_empty_finetune_set_is_refused(tmp_path, smf_export):
    export, _ = smf_export
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": "   "}) + "\n")
    from pretrain.data import DataError

    with pytest.raises(DataError, match="no document"):
        FinetuneSet([tmp_path / "empty.jsonl"], Tokenizer(export / "tokenizer.model"), 16)


def test_finetune_tool_writes_an_export_and_refuses_bad_input(smf_export, tmp_path, capsys):
    from tools.smf_finetune import main

    export, dataset = smf_export
    data = str(dataset / "new_facts.jsonl")
    out = tmp_path / "sparse"
    assert (
        main(
            [
                "--export",
                str(export),
                "--data",
                data,
                "--out",
                str(out),
                "--method",
                "sparse",
                "--lr",
                "5",
                "--top-t",
                "16",
                "--epochs",
                "1",
                "--max-grad-norm",
                "1",
            ]
        )
        == 0
    )
    # the epoch's record is its line and config.json's; a raw JSON copy of it no longer ends stdout
    assert capsys.readouterr().out.splitlines()[-1] == f"finetuned export written to {out}"
    record = json.loads((out / "config.json").read_text())["memlayers"]["finetune"]
    assert record["method"] == "sparse" and record["top_t"] == 16 and "new_fact_recall" in record["history"][-1]
    assert record["table"] == str(export / "slot_frequencies.safetensors")  # the table it ranked against
    assert not torch.equal(load(out).values[0].weight, load(export).values[0].weight)
    assert main(["--export", str(export), "--data", data, "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    other = tmp_path / "other.safetensors"  # a table counted for another model: refused before any training
    from pretrain.slots import save_table

    table = load_table(export)
    state = {
        "meta": {"layer_names": table.layers, "num_slots": table.num_slots, "granularity": "document", "step": 1},
        "totals": torch.tensor([table.num_documents, table.num_tokens]),
    }
    for layer in table.layers:
        state[f"{layer}.counts"] = table.counts[layer]
        state[f"{layer}.doc_freq"] = table.doc_freq[layer]
    save_table(other, state, {"model_config_hash": "0" * 64})
    assert main(["--export", str(export), "--data", data, "--out", str(tmp_path / "x"), "--table", str(other)]) == 2
    assert "different model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    missing = tmp_path / "new_fact.jsonl"  # a typo in --data: named with the flag this tool has
    assert main(["--export", str(export), "--data", str(missing), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "check --data" in err and "--input" not in err
    assert not (tmp_path / "y").exists()
    weights = export / "model.safetensors"  # a binary file named itself: its bytes were the finetuning text
    assert main(["--export", str(export), "--data", str(weights), "--out", str(tmp_path / "z")]) == 2
    assert f"--data {weights} is not text (a NUL byte in its first 8 KiB" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_finetune_tool_reads_a_file_whole_with_format_text(smf_export, tmp_path, capsys):
    """A .json file that is one JSON document was refused with "pass --format text", an option
    this tool did not have; it has prepare_data's --format now."""
    from tools.smf_finetune import main

    export, _ = smf_export
    notes = tmp_path / "notes.json"
    notes.write_text('[\n  {"fact": "the lighthouse keeper of Varno is named Ilsa"}\n]\n')
    args = ["--export", str(export), "--data", str(notes), "--method", "full", "--epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "pass --format text" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*args, "--out", str(tmp_path / "b"), "--format", "text"]) == 0
    record = json.loads((tmp_path / "b" / "config.json").read_text())["memlayers"]["finetune"]
    assert record["method"] == "full" and len(record["history"]) >= 1


@pytest.mark.parametrize(
    "flag",
    [
        ["--table", "t.safetensors"],
        ["--allow-other-run"],
        ["--top-t", "16"],
        ["--max-grad-norm", "0.05"],
        ["--max-grad-norm", "0"],
    ],
)
@pytest.mark.parametrize("method", ["lora", "full"])
def test_finetune_tool_refuses_sparse_only_options_for_other_methods(flag, method, capsys):
    """--top-t and --max-grad-norm were taken by --method full and lora without a word (neither
    ranks slots nor clips), as --table and --allow-other-run no longer were. --max-grad-norm 0
    (sparse's "off") still was: the check compared with `in (None, False)` and 0.0 == False."""
    from tools.smf_finetune import main

    with pytest.raises(SystemExit) as exit_:
        main(["--export", "e", "--data", "d", "--out", "o", "--method", method, *flag])
    assert exit_.value.code == 2 and f"{flag[0]} is read only by --method sparse" in capsys.readouterr().err


def test_a_lora_rank_above_every_projection_s_rank_is_refused_before_any_work(
    smf_export, tmp_path, monkeypatch, capsys
):
    """--lora-rank 100000 on the tiny export evaluated and trained for minutes without a word: an
    adapter of rank above min(in, out) of every adapted projection spans no more updates."""
    import pretrain.smf
    from tools.smf_finetune import main

    export, dataset = smf_export
    model = load(export)
    top = max(min(m.in_features, m.out_features) for n, m in model.named_modules() if n.endswith(LORA_TARGETS))
    with pytest.raises(ValueError, match=f"LoRA rank={top + 1} exceeds the rank of every adapted projection"):
        build_method("lora", model, lr=1e-3, lora_rank=top + 1)
    build_method("lora", load(export), lr=1e-3, lora_rank=top)  # the full rank itself is taken
    monkeypatch.setattr(pretrain.smf, "LearningForgettingEval", lambda *a, **k: pytest.fail("evaluated"))
    data = str(dataset / "new_facts.jsonl")
    argv = ["--export", str(export), "--data", data, "--out", str(tmp_path / "o"), "--method", "lora"]
    assert main([*argv, "--lora-rank", str(top + 1)]) == 2
    assert f"error: --lora-rank {top + 1}: LoRA rank={top + 1} exceeds" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["sparse", "full"])
def test_finetune_tool_refuses_lora_rank_for_other_methods(method, capsys):
    """--lora-rank was taken by --method sparse and full without a word (they add no adapters)."""
    from tools.smf_finetune import main

    with pytest.raises(SystemExit) as exit_:
        main(["--export", "e", "--data", "d", "--out", "o", "--method", method, "--lora-rank", "4"])
    err = capsys.readouterr().err
    assert (
        exit_.value.code == 2
        and f"--lora-rank is read only by --method lora (the adapters' rank), not --method {method}" in err
    )


def test_finetune_tool_refuses_an_out_it_cannot_write_before_training(smf_export, tmp_path, capsys, monkeypatch):
    """--out = the export, a folder holding it, or a file, even with --force: refused with exit 2
    before any finetuning. Before, the tool finetuned every epoch and then crashed in the save
    (a traceback, or NotADirectoryError for a file), and a folder holding the export was
    replaced with --force, deleting the source export."""
    import shutil

    import pretrain.smf
    from tools.smf_finetune import main

    export, dataset = smf_export
    parent = tmp_path / "exports"
    source = parent / "src"
    shutil.copytree(export, source)
    files = sorted(p.name for p in source.iterdir())
    (tmp_path / "a_file").write_text("mine")

    def no_training(*args, **kwargs):
        raise AssertionError("finetuned although --out cannot be written")

    monkeypatch.setattr(pretrain.smf, "finetune", no_training)
    data = str(dataset / "new_facts.jsonl")
    for out, why in (
        (source, "is the source export"),
        (parent, "holds the source export"),
        (tmp_path / "a_file", "is a file"),
    ):
        argv = ["--export", str(source), "--data", data, "--out", str(out), "--epochs", "1", "--force"]
        assert main(argv) == 2
        assert why in capsys.readouterr().err
        assert sorted(p.name for p in source.iterdir()) == files  # the source export is intact
    assert (tmp_path / "a_file").read_text() == "mine"
    # --out = the folder of the --data file or of --dataset-dir: with --force the finished export
    # replaced it, deleting the user's corpus (seen with --method full, 1 epoch, on the demo's export)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(data, corpus / "facts.jsonl")
    argv = ["--export", str(source), "--data", str(corpus / "facts.jsonl"), "--epochs", "1", "--force"]
    assert main([*argv, "--out", str(corpus)]) == 2
    assert (
        f"{corpus} holds the --data file {corpus / 'facts.jsonl'}: replacing it would delete" in capsys.readouterr().err
    )
    assert main([*argv, "--out", str(dataset), "--dataset-dir", str(dataset)]) == 2
    assert f"{dataset} is the --dataset-dir {dataset}: write to a new folder" in capsys.readouterr().err
    assert [p.name for p in corpus.iterdir()] == ["facts.jsonl"] and (dataset / "manifest.json").is_file()
    with pytest.raises(ExportError, match="holds the source export"):
        save_finetuned_export(source, load(source), parent, {}, force=True)
    assert sorted(p.name for p in source.iterdir()) == files


def test_finetune_tool_measures_the_validation_loss_of_an_export_without_probes(smf_export, tmp_path, capsys):
    """An export of a run on prepared text has no probes.jsonl. --dataset-dir was first ignored (no loss,
    no word), then refused ('has no probes.jsonl: drop --dataset-dir'), so finetuning one's own model
    could not measure what it forgets of its pretraining corpus. It now gets the validation loss alone,
    before and after each evaluated epoch: the same loss the export with probes reports."""
    import shutil

    from tools.smf_finetune import main

    export, dataset = smf_export
    bare = tmp_path / "export"
    shutil.copytree(export, bare)
    (bare / "probes.jsonl").unlink()
    args = ["--data", str(dataset / "new_facts.jsonl"), "--method", "full", "--epochs", "1"]
    records = {}
    for name, source in (("bare", bare), ("with_probes", export)):
        out = tmp_path / f"out_{name}"
        assert main(["--export", str(source), *args, "--out", str(out), "--dataset-dir", str(dataset)]) == 0
        records[name] = json.loads((out / "config.json").read_text())["memlayers"]["finetune"]
    before = [line for line in capsys.readouterr().out.splitlines() if line.startswith("before ")]
    assert before[0].startswith("before data_loss ") and " val_loss " in before[0]  # the bare export's
    bare_run, probed = records["bare"], records["with_probes"]
    assert set(bare_run["before"]) == {"data_loss", "val_loss"} and "new_fact_recall" in probed["before"]
    assert bare_run["before"]["val_loss"] == probed["before"]["val_loss"]
    assert bare_run["history"][-1]["val_loss"] == pytest.approx(probed["history"][-1]["val_loss"], rel=1e-6)
    assert "new_fact_recall" not in bare_run["history"][-1]


def test_finetune_tool_says_how_documents_became_rows_and_steps(smf_export, tmp_path, capsys):
    """`--batch-size` counts rows, and a document longer than the context is several rows: the walk's 6
    held-out man pages became 72 rows, so `--batch-size 6` ("documents per step", said the help) took 12
    steps an epoch, and the tool's first line, '72 rows, 8768 tokens', did not say why. It now names the
    documents, the rows they became and the steps of an epoch; the counts are checked against the
    windows FinetuneSet cuts (a long document, cut, and a short one, whole)."""
    from tools.smf_finetune import main

    export, _ = smf_export
    tok = Tokenizer(export / "tokenizer.model")
    long_text = " ".join(["Ada was born in Aldmere."] * 60)
    data = tmp_path / "ft.jsonl"
    data.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "Hi."}) + "\n")
    max_seq_len = json.loads((export / "config.json").read_text())["model"]["max_seq_len"]
    long_ids = 1 + len(tok.encode(long_text))  # "<eos> tokens", windows overlapping by one
    rows = -(-(long_ids - 1) // max_seq_len) + 1
    tokens = long_ids - 1 + len(tok.encode("Hi."))
    assert rows >= 3  # the long document is cut
    args = ["--export", str(export), "--data", str(data), "--out", str(tmp_path / "out"), "--method", "full"]
    assert main([*args, "--epochs", "1", "--batch-size", "2"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        f"2 documents in {rows} rows of up to {max_seq_len} tokens (a longer document is cut into windows), "
        f"{tokens} tokens; {-(-rows // 2)} steps of up to 2 rows an epoch; method full, lr 0.0001"
    )


def test_finetuning_an_export_without_probes_reports_the_loss_on_its_own_text(smf_export, tmp_path, capsys):
    """An export of a run on one's own text has no probes, so nothing measured what finetuning learns: the
    tool printed only the epochs' training means ('epoch 1 ... loss 5.873'), and no loss of the model before
    finetuning or after, to compare. It reports `data_loss`, the --data text's loss (every row once),
    before and after each evaluated epoch, with or without --dataset-dir. The reference scores the rows
    itself, in float64, with the export before and the finetuned export after."""
    import shutil

    import torch.nn.functional as F

    from tools.smf_finetune import main

    export, dataset = smf_export
    bare = tmp_path / "export"
    shutil.copytree(export, bare)
    (bare / "probes.jsonl").unlink()
    text = dataset / "new_facts.jsonl"

    def loss_of(folder) -> float:
        model = load(folder).eval()
        rows = FinetuneSet([text], Tokenizer(folder / "tokenizer.model"), model.cfg.max_seq_len).rows
        total, count = 0.0, 0
        with torch.no_grad():
            for row in rows:
                logits = model(torch.tensor([row[:-1]])).double()[0]
                total += F.cross_entropy(logits, torch.tensor(row[1:]), reduction="sum").item()
                count += len(row) - 1
        return total / count

    out = tmp_path / "out"
    assert (
        main(["--export", str(bare), "--data", str(text), "--out", str(out), "--method", "full", "--epochs", "2"]) == 0
    )
    record = json.loads((out / "config.json").read_text())["memlayers"]["finetune"]
    assert set(record["before"]) == {"data_loss"} and [set(r) >= {"data_loss"} for r in record["history"]] == [True] * 2
    assert record["before"]["data_loss"] == pytest.approx(loss_of(bare), rel=1e-5)
    assert record["history"][-1]["data_loss"] == pytest.approx(loss_of(out), rel=1e-5)
    assert record["history"][-1]["data_loss"] < record["before"]["data_loss"]  # full finetuning learns its text
    assert f"before data_loss {record['before']['data_loss']:.4g}" in capsys.readouterr().out


def test_the_finetune_record_names_the_table_and_data_by_absolute_paths(smf_export, tmp_path, monkeypatch, capsys):
    """Run from the folder above the export with relative paths, the record stored the table relative
    (`export/slot_frequencies.safetensors`) beside the --data as given; read from the new export's folder, a
    relative path names nothing there. Both are now absolute, resolved."""
    from tools.smf_finetune import main

    export, dataset = smf_export
    monkeypatch.chdir(export.parent)
    data = os.path.relpath(dataset / "new_facts.jsonl", export.parent)
    argv = ["--export", export.name, "--data", data, "--out", str(tmp_path / "out"), "--method", "sparse"]
    assert main([*argv, "--epochs", "1", "--top-t", "16"]) == 0
    record = json.loads((tmp_path / "out" / "config.json").read_text())["memlayers"]["finetune"]
    assert record["table"] == str((export / "slot_frequencies.safetensors").resolve())
    assert record["data"] == [str((dataset / "new_facts.jsonl").resolve())]
