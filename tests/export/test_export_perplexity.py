"""memlayers-perplexity (pretrain/export/perplexity.py): an export's loss on a dataset split,
against a brute-force float64 reference that scores each sequence alone, token by token."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.data import DataError, read_manifest
from pretrain.data.shards import read_blocks
from pretrain.export import export_checkpoint
from pretrain.export.loading import load
from pretrain.export.perplexity import dataset_loss
from pretrain.train import train
from tests.train.helpers import tiny_config
from tools import perplexity as perplexity_cli


@pytest.fixture(scope="module")
def export_and_data(tmp_path_factory, data_cache) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("perplexity")
    cfg = tiny_config(root / "run", data_cache, "train.max_steps=4", "optim.lr=1e-2")
    train(cfg)
    dataset = next(p.parent for p in Path(data_cache).rglob("manifest.json"))
    return export_checkpoint(root / "run", root / "export", show_progress=False), dataset


def split_rows(dataset: Path, split: str):
    """Each stored row of `split` (seq_len + 1 tokens) with its count of valid tokens (the shard's
    meta; the rest is padding), read straight from the shards."""
    manifest = read_manifest(dataset)
    width = manifest["seq_len"] + 1
    for shard in manifest["splits"][split]["shards"]:
        for tokens, meta in read_blocks(dataset / shard["path"], width, manifest["token_dtype"], shard["sequences"]):
            for row, valid in zip(tokens, meta[:, 1]):
                yield row, int(valid)


def brute_force(export: Path, dataset: Path, split: str) -> tuple[float, int]:
    """Each sequence alone; log-softmax in float64; a target counts when it is one of the
    row's valid tokens (the shard's meta), padding excluded."""
    model = load(export)
    nll, count = 0.0, 0
    for row, valid in split_rows(dataset, split):
        inputs, targets = torch.from_numpy(row[:-1].copy()), torch.from_numpy(row[1:].copy())
        with torch.no_grad():
            logp = torch.log_softmax(model(inputs[None])[0].double(), dim=-1)
        keep = torch.arange(1, len(row)) < valid
        nll -= logp[keep].gather(1, targets[keep, None]).sum().item()
        count += int(keep.sum())
    return nll / count, count


def brute_force_by_document(export: Path, dataset: Path, split: str) -> tuple[float, int]:
    """Each document of each row alone (a row splits after every EOS), log-softmax in float64:
    what attention within documents computes, by an independent route."""
    from pretrain.data import Tokenizer

    model = load(export)
    eos = Tokenizer(dataset / "tokenizer.model").eos_id
    nll, count = 0.0, 0
    for row, valid in split_rows(dataset, split):
        n = valid - 1  # scored targets: row[1:valid]
        starts = [0] + [i + 1 for i in range(n - 1) if row[i] == eos]
        for start, end in zip(starts, starts[1:] + [n]):
            inputs = torch.from_numpy(row[start:end].astype(np.int64))
            targets = torch.from_numpy(row[start + 1 : end + 1].astype(np.int64))
            with torch.no_grad():
                logp = torch.log_softmax(model(inputs[None])[0].double(), dim=-1)
            nll -= logp.gather(1, targets[:, None]).sum().item()
            count += end - start
    return nll / count, count


def test_an_export_of_a_run_with_document_masking_is_scored_with_it(export_and_data, tmp_path, data_cache, capsys):
    """memlayers-perplexity attended across packed documents unless told --document-masking, so a
    run trained with data.document_masking=true scored worse than its own validation loss (1.51
    against 1.39 on the fact world after 150 steps), silently: the export now records the setting."""
    export, dataset = export_and_data
    assert json.loads((export / "config.json").read_text())["memlayers"]["document_masking"] is False
    cfg = tiny_config(tmp_path / "run", data_cache, "train.max_steps=4", "optim.lr=1e-2", "data.document_masking=true")
    train(cfg)
    masked = export_checkpoint(tmp_path / "run", tmp_path / "export", show_progress=False)
    assert json.loads((masked / "config.json").read_text())["memlayers"]["document_masking"] is True
    got = dataset_loss(masked, dataset, "val", batch_size=4, show_progress=False)
    want, tokens = brute_force_by_document(masked, dataset, "val")
    assert got["document_masking"] is True and got["tokens"] == tokens
    assert math.isclose(got["loss"], want, rel_tol=1e-6)
    across = dataset_loss(masked, dataset, "val", batch_size=4, document_masking=False, show_progress=False)
    unmasked, _ = brute_force(masked, dataset, "val")
    assert across["document_masking"] is False and math.isclose(across["loss"], unmasked, rel_tol=1e-6)
    assert abs(unmasked - want) > 100 * 1e-6 * want  # the two are told apart (after 4 steps, by ~1e-4)
    assert perplexity_cli.main([str(masked), "--data", str(dataset), "--no-progress"]) == 0
    assert f"loss {got['loss']:.4f}" in capsys.readouterr().out
    assert perplexity_cli.main([str(masked), "--data", str(dataset), "--no-progress", "--no-document-masking"]) == 0
    assert f"loss {across['loss']:.4f}" in capsys.readouterr().out


def test_loss_equals_scoring_every_sequence_alone_in_float64(export_and_data):
    export, dataset = export_and_data
    got = dataset_loss(export, dataset, "val", batch_size=3, show_progress=False)
    want, tokens = brute_force(export, dataset, "val")
    assert got["tokens"] == tokens
    assert got["sequences"] == read_manifest(dataset)["splits"]["val"]["sequences"]
    assert math.isclose(got["loss"], want, rel_tol=1e-6)
    assert math.isclose(got["perplexity"], math.exp(want), rel_tol=1e-5)
    # batching does not change it beyond float32 summation order
    other = dataset_loss(export, dataset, "val", batch_size=7, show_progress=False)
    assert other["tokens"] == tokens and math.isclose(other["loss"], got["loss"], rel_tol=1e-6)


def test_cli_writes_json_and_refuses_another_tokenizer(export_and_data, tmp_path, capsys):
    export, dataset = export_and_data
    out = tmp_path / "ppl.json"
    code = perplexity_cli.main([str(export), "--data", str(dataset), "--max-batches", "2", "--batch-size", "4",
                                "--json", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["sequences"] == 8 and np.isfinite(result["loss"])
    assert f"loss {result['loss']:.4f}" in capsys.readouterr().out
    other = tmp_path / "other_tok"
    other.mkdir()
    for item in export.iterdir():
        (other / item.name).write_bytes(item.read_bytes())
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"another corpus line {i} with words" for i in range(300)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tok"), vocab_size=300, byte_fallback=True,
        minloglevel=2,
    )  # fmt: skip
    (other / "tokenizer.model").write_bytes((tmp_path / "tok.model").read_bytes())
    with pytest.raises(DataError, match="differs from the one .*manifest.json was built with"):
        dataset_loss(other, dataset, "val", show_progress=False)
    assert perplexity_cli.main([str(other), "--data", str(dataset), "--no-progress"]) == 2


def test_batch_counts_below_one_are_refused_before_anything_is_read(tmp_path, monkeypatch, capsys):
    """--max-batches -3 was taken as 'no limit' (the code tests > 0) and read the whole split."""

    def unread(*args, **kwargs):
        raise AssertionError("the export was read")

    monkeypatch.setattr("pretrain.export.perplexity.dataset_loss", unread)
    for option, value in (("--max-batches", "-3"), ("--max-batches", "0"), ("--batch-size", "0")):
        with pytest.raises(SystemExit) as exit_:
            perplexity_cli.main([str(tmp_path / "export"), "--data", str(tmp_path / "data"), option, value])
        assert exit_.value.code == 2
        assert f"argument {option}: {value} must be an integer >= 1" in capsys.readouterr().err
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"max_batches=-3 must be >= 0 \(0: the whole split\)"):
        dataset_loss(tmp_path / "export", tmp_path / "data", max_batches=-3, show_progress=False)


def test_cli_refuses_a_folder_as_json_before_scoring(tmp_path, monkeypatch, capsys):
    # a folder as --json crashed in the final rename (IsADirectoryError), after the whole split was scored
    scored = []
    result = {"loss": 1.0, "perplexity": math.e, "tokens": 1, "sequences": 1}
    monkeypatch.setattr("pretrain.export.perplexity.dataset_loss", lambda *a, **k: scored.append(1) or result)
    folder = tmp_path / "results"
    folder.mkdir()
    with pytest.raises(SystemExit) as exit_:
        perplexity_cli.main([str(tmp_path / "export"), "--data", str(tmp_path / "data"), "--json", str(folder)])
    assert exit_.value.code == 2 and not scored
    assert f"argument --json: {folder} is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == [] and not list(tmp_path.glob(".results*"))


def test_sequences_longer_than_the_model_are_refused_before_it_loads(export_and_data, tmp_path, monkeypatch, capsys):
    """A dataset prepared with a longer --seq-len than the export's max_seq_len is refused up
    front (the model would raise at its first batch), naming both lengths and the fix."""
    import shutil

    export, dataset = export_and_data
    seq_len = read_manifest(dataset)["seq_len"]
    short = tmp_path / "short"
    shutil.copytree(export, short)
    config = json.loads((short / "config.json").read_text())
    config["model"]["max_seq_len"] = seq_len // 2
    (short / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr("pretrain.export.loading.load", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ValueError, match=rf"sequences of {seq_len} tokens, longer than .*max_seq_len={seq_len // 2}"):
        dataset_loss(short, dataset, "val", show_progress=False)
    assert perplexity_cli.main([str(short), "--data", str(dataset), "--no-progress"]) == 2
    assert f"prepare the data with --seq-len {seq_len // 2} or less" in capsys.readouterr().err


def test_a_misspelt_data_folder_names_the_dataset_beside_it_not_data_dir(export_and_data, tmp_path, capsys):
    """--data data/pyjsn said 'dataset directory data/pyjsn does not exist: prepare it with
    tools/prepare_data.py or set data.dir', a trainer key this tool does not read. It now names the
    prepared dataset beside it, or the prepare_data command that writes that folder."""
    import shutil

    export, dataset = export_and_data
    data = tmp_path / "data"
    shutil.copytree(dataset, data / "english")
    for given, near in ((data / "englsh", data / "english"), (tmp_path / "nothing" / "here", None)):
        assert perplexity_cli.main([str(export), "--data", str(given), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "data.dir" not in err
        hint = f"did you mean {near}? Or prepare" if near else "does not exist: prepare"
        assert f"{hint} it with tools/prepare_data.py --input <corpus> --output {given}" in err


def test_smf_validation_of_a_run_with_document_masking_is_scored_with_it(tmp_path, data_cache):
    """SMF's validation loss (LearningForgettingEval, built by load_sweep_inputs and memlayers'
    smf_finetune) attended across packed documents even for a run trained with
    data.document_masking=true, which its export records: it now scores as the run trained, the
    loss of each document alone in float64."""
    from pretrain.smf.experiment import load_sweep_inputs

    cfg = tiny_config(tmp_path / "run", data_cache, "train.max_steps=4", "optim.lr=1e-2", "data.document_masking=true")
    train(cfg)
    export = export_checkpoint(tmp_path / "run", tmp_path / "export", show_progress=False)
    dataset = next(p.parent for p in Path(data_cache).rglob("manifest.json"))
    assert read_manifest(dataset)["splits"]["val"]["sequences"] <= 8 * 16  # all read (val_batches x batch_size)
    inputs = load_sweep_inputs(export, [dataset / "new_facts.jsonl"], dataset, with_table=False)
    got = inputs.evaluate(load(export))["val_loss"]
    want, _ = brute_force_by_document(export, dataset, "val")
    across, _ = brute_force(export, dataset, "val")
    assert abs(across - want) > 100 * 1e-6 * want  # the two are told apart
    assert math.isclose(got, want, rel_tol=1e-6)
