"""Training on prepared datasets that are not the fact world: no probes, the dataset's vocabulary,
mixtures of sources with exact resume on 1 and 2 ranks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch

from data_helpers import SEQ_LEN, row_keys, shard_rows
from pretrain.config import ConfigError, load_config
from pretrain.data import DataError, Tokenizer
from pretrain.data.sources import padded_vocab_size
from pretrain.train import train
from tests.train.helpers import TINY, final_parameters, run_ranks

# The trainer tests' tiny model, without the values a dataset records (vocab size, seq len).
OWN = [o for o in TINY if not o.startswith(("model.vocab_size=", "data.vocab_size=", "data.seq_len="))]


def own_config(run_dir: Path, *overrides: str):
    return load_config(None, [*OWN, f"train.run_dir={run_dir}", *overrides])


def sources(a: Path, b: Path) -> str:
    return f"data.sources=[{{dir: {a}, weight: 1.0, name: a}}, {{dir: {b}, weight: 2.0, name: b}}]"


def test_dataset_without_probes_trains_and_exports(tmp_path, dataset, capsys):
    from pretrain.export import export_checkpoint

    tok = Tokenizer(dataset / "tokenizer.model")
    cfg = own_config(tmp_path / "run", f"data.dir={dataset}", "train.max_steps=3", "train.eval_every=3")
    assert cfg.model.vocab_size == padded_vocab_size(tok.vocab_size) and cfg.model.vocab_size % 64 == 0
    assert cfg.data.seq_len == SEQ_LEN and cfg.data.vocab_size == tok.vocab_size
    result = train(cfg)
    assert result.step == 3
    assert set(result.eval) == {"val_loss", "val_perplexity"}  # no fact recall without probes
    log = capsys.readouterr().out
    assert log.count("no probes.jsonl") == 1
    assert f"tokenizer {tok.vocab_size} tokens, model.vocab_size {cfg.model.vocab_size}" in log
    assert f"plan: 3 steps x {cfg.train.global_batch} sequences x {SEQ_LEN} tokens = " in log
    out = export_checkpoint(tmp_path / "run", tmp_path / "export", show_progress=False)
    assert (out / "model.safetensors").is_file() and not (out / "probes.jsonl").exists()


def test_explicit_vocab_size_smaller_than_the_tokenizer_is_refused(dataset):
    tok = Tokenizer(dataset / "tokenizer.model")
    with pytest.raises(
        ConfigError,
        match=rf"model.vocab_size=256 is smaller than the tokenizer of .* "
        rf"\({tok.vocab_size} tokens\): drop the setting",
    ):
        load_config(None, [*OWN, f"data.dir={dataset}", "model.vocab_size=256"])
    cfg = load_config(None, [*OWN, f"data.dir={dataset}", "model.vocab_size=1000"])
    assert cfg.model.vocab_size == 1000  # larger is allowed (unused rows)
    with pytest.raises(ConfigError, match=rf"seq_len={SEQ_LEN} but data.seq_len=16"):
        load_config(None, [*OWN, f"data.dir={dataset}", "data.seq_len=16"])
    with pytest.raises(ConfigError, match=rf"data.seq_len={SEQ_LEN} must be .*: set model.max_seq_len={SEQ_LEN}"):
        load_config(None, [*OWN, f"data.dir={dataset}", "model.max_seq_len=16"])


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_resume_is_exact(tmp_path, dataset, second_dataset, workers):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opts = (sources(dataset, second_dataset), "train.max_steps=4", "train.eval_every=2", f"data.num_workers={workers}")
    straight = train(own_config(tmp_path / "a", *opts))
    first = train(own_config(tmp_path / "b", *opts, "train.stop_after=2"))
    second = train(own_config(tmp_path / "b", *opts))
    assert first.losses + second.losses == straight.losses  # bitwise
    a, b = final_parameters(tmp_path / "a"), final_parameters(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert set(straight.eval) == {"val_loss", "val_perplexity", "val_loss/a", "val_loss/b"}
    mean = (1 * straight.eval["val_loss/a"] + 2 * straight.eval["val_loss/b"]) / 3
    assert straight.eval["val_loss"] == pytest.approx(mean, rel=1e-12)
    board = EventAccumulator(str(tmp_path / "a" / "tensorboard")).Reload()
    seen = {n: board.Scalars(f"data/tokens_seen/{n}")[-1].value for n in "ab"}
    assert seen["a"] + seen["b"] == straight.tokens_seen  # every trained token is some source's
    assert {"eval/val_loss/a", "eval/val_loss/b"} <= set(board.Tags()["scalars"])


def _mixture_runs(rank: int, root: str, opts: list[str]) -> dict:
    straight = train(own_config(Path(root) / "straight", *opts)).losses
    first = train(own_config(Path(root) / "split", *opts, "train.stop_after=2")).losses
    second = train(own_config(Path(root) / "split", *opts)).losses
    return {"straight": straight, "split": first + second}


@pytest.mark.slow
def test_mixture_resume_is_exact_on_two_ranks(tmp_path, dataset, second_dataset):
    opts = [sources(dataset, second_dataset), "train.max_steps=4", "train.zero_stage=1"]
    results = run_ranks(2, _mixture_runs, (str(tmp_path), opts), tmp_path / "results")
    assert results[0] == results[1]
    assert results[0]["split"] == results[0]["straight"]
    a, b = final_parameters(tmp_path / "straight"), final_parameters(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mixture_weights_may_change_on_resume(tmp_path, dataset, second_dataset, capsys):
    """An annealing mixture: 1:2 for 2 steps, then 3:1. The resume says so, the validation mean
    follows the new weights, and every trained token is still some source's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opts = ("train.max_steps=4", "train.eval_every=4")
    train(own_config(tmp_path / "run", sources(dataset, second_dataset), *opts, "train.stop_after=2"))
    annealed = (
        f"data.sources=[{{dir: {dataset}, weight: 3.0, name: a}}, {{dir: {second_dataset}, weight: 1.0, name: b}}]"
    )
    result = train(own_config(tmp_path / "run", annealed, *opts))
    assert result.step == 4
    assert "data.sources changed from step 2: a 1 -> 3; b 2 -> 1" in capsys.readouterr().out
    mean = (3 * result.eval["val_loss/a"] + 1 * result.eval["val_loss/b"]) / 4
    assert result.eval["val_loss"] == pytest.approx(mean, rel=1e-12)
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    seen = {n: board.Scalars(f"data/tokens_seen/{n}")[-1].value for n in "ab"}
    assert seen["a"] + seen["b"] == result.tokens_seen
    renamed = (
        f"data.sources=[{{dir: {dataset}, weight: 3.0, name: a}}, {{dir: {second_dataset}, weight: 1.0, name: c}}]"
    )
    with pytest.raises(DataError, match=r"'c' reads .*, which this run read as 'b' so far: keep the name 'b'"):
        train(own_config(tmp_path / "run", renamed, *opts))  # would read b's rows again from the start


def test_a_source_added_on_resume_starts_at_its_beginning(tmp_path, dataset, second_dataset, capsys):
    """A run on data.dir for 2 steps, then with a second source added (data.dir is the mixture of
    one named after its folder): the resume says so, the new source's first rows are its own
    reader's first rows, and the tokens of both sources add up to the run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    opts = ("train.max_steps=6", "train.eval_every=6", "data.document_masking=true")
    train(own_config(tmp_path / "run", f"data.dir={dataset}", *opts, "train.stop_after=2"))
    name = dataset.name  # "data": the folder's name
    added = f"data.sources=[{{dir: {dataset}, weight: 1.0, name: {name}}}, {{dir: {second_dataset}, weight: 3.0, name: new}}]"
    result = train(own_config(tmp_path / "run", added, *opts))
    assert result.step == 6
    log = capsys.readouterr().out
    assert "data.sources changed from step 2: added new (weight 3, from its start)" in log
    assert set(result.eval) >= {f"val_loss/{name}", "val_loss/new"}
    board = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    seen = {n: board.Scalars(f"data/tokens_seen/{n}")[-1].value for n in (name, "new")}
    assert seen[name] + seen["new"] == result.tokens_seen and seen["new"] > 0
    per_step = result.tokens_seen // 6
    assert seen[name] >= 2 * per_step  # the first 2 steps were all its own: its count went on over the resume


def test_heldout_corpus_is_evaluated_not_trained_on(tmp_path, dataset, second_dataset):
    """data.eval_sources: heldout_loss/<name> equals the loss of the exported model on those
    batches, computed here without the trainer; the corpus adds no training tokens."""
    from pretrain.data import ShardLoader
    from pretrain.export import export_checkpoint, load
    from pretrain.model import language_model_loss

    held = f"data.eval_sources=[{{dir: {second_dataset}, name: held}}]"
    run = tmp_path / "run"
    result = train(own_config(run, f"data.dir={dataset}", held, "train.max_steps=3", "train.eval_every=3"))
    assert set(result.eval) == {"val_loss", "val_perplexity", "heldout_loss/held"}
    model = load(export_checkpoint(run, tmp_path / "export", show_progress=False))
    cfg = own_config(run, f"data.dir={dataset}")
    loader = ShardLoader(second_dataset, "val", cfg.train.micro_batch, seed=cfg.train.seed, loop=False)
    batches = [batch for batch, _ in zip(loader, range(cfg.train.eval_batches))]
    with torch.no_grad():
        losses = [language_model_loss(model(b.tokens), b.targets).double() * b.tokens.numel() for b in batches]
    expected = float(sum(losses) / sum(b.tokens.numel() for b in batches))
    assert result.eval["heldout_loss/held"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("micro,eval_batches", [(4, 2), (7, 3), (4, 1000)])
def test_validation_reads_each_row_at_most_once(tmp_path, dataset, monkeypatch, micro, eval_batches):
    """An evaluation reads the first train.eval_batches x micro_batch rows of a validation split,
    each once, and a shorter split whole and once (before, the loader looped: the docs/own-corpus.md recipe's
    data/pydocs, 81 validation rows, at 8 batches of 16 weighed 47 of them twice), and no batch past
    them is read and thrown away (zip(loader, range(n)) read n + 1). Counted against
    the split's shards read directly, at world 1 (tests/train/test_validation_split.py splits them
    over 2 ranks)."""
    import pretrain.evaluate
    from pretrain.build import build_loader
    from pretrain.data.sources import resolve_sources
    from pretrain.evaluate import Evaluator

    read = []
    monkeypatch.setattr(pretrain.evaluate, "validation_loss", lambda _, batches, *a: read.append(batches) or {})
    cfg = own_config(
        tmp_path, f"data.dir={dataset}", f"train.micro_batch={micro}", f"train.global_batch={micro}",
        f"train.eval_batches={eval_batches}",
    )  # fmt: skip
    (source,) = resolve_sources(cfg.data, cfg.data.seq_len)
    pulled = []

    def counting_loader(*args, **kwargs):  # counts the batches taken from the loader
        for batch in build_loader(*args, **kwargs):
            pulled.append(batch)
            yield batch

    Evaluator(cfg, [source], None, counting_loader, torch.device("cpu")).loss_on(None, source, "val")
    assert len(pulled) == len(read[0])  # no batch is read and thrown away past the last one used
    reference = Counter(row for shard in shard_rows(dataset, "val") for row in shard)
    rows = Counter(k for b in read[0] for k in row_keys(b, source.manifest["eos_id"]))
    assert set(rows) <= set(reference) and max(rows.values()) == 1
    assert sum(rows.values()) == min(micro * eval_batches, sum(reference.values()))


@pytest.mark.parametrize(
    "spec,message",
    [
        ("{dir: DATASET, name: x}", "is trained on (data.dir / data.sources)"),
        ("{dir: SECOND, name: data}", "the name 'data' is already used"),
        (
            "{dir: MISSING}",
            "holds no manifest.json (the directory does not exist): prepare it with tools/prepare_data.py",
        ),
    ],
)
def test_bad_heldout_corpora_are_refused_at_config_time(tmp_path, dataset, second_dataset, spec, message):
    spec = spec.replace("DATASET", str(dataset)).replace("SECOND", str(second_dataset))
    spec = spec.replace("MISSING", str(tmp_path / "nothing"))
    with pytest.raises(
        ConfigError, match=r"data.eval_sources\[0\] .*" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        own_config(tmp_path / "run", f"data.dir={dataset}", f"data.eval_sources=[{spec}]")


def test_fewer_rows_than_readers_are_refused_before_the_model_is_built(tmp_path, tokenizer, documents, monkeypatch):
    """The loader splits an epoch's rows over ranks x data.num_workers readers, so any number of
    shards serves any number of readers that has a row each; fewer rows than readers is refused,
    by the loader (built after the model and the DeepSpeed engine, and through memlayers-submit
    after the queue) and by the run's start-up check (`check_runtime`, which the trainer and
    memlayers-submit call) alike: the loader itself is the reference."""
    import pretrain.build as build_module
    from pretrain.config import check_runtime
    from pretrain.data import ShardLoader, write_dataset

    data = tmp_path / "data"
    manifest = write_dataset(
        tokenizer.encode_batch(documents),
        data,
        tokenizer,
        SEQ_LEN,
        val_fraction=0.2,
        sequences_per_shard=40,
        show_progress=False,
    )
    shards, sequences = len(manifest["splits"]["train"]["shards"]), manifest["splits"]["train"]["sequences"]
    assert 2 <= shards <= 8
    cfg = own_config(tmp_path / "run", f"data.dir={data}", "train.global_batch=48", "train.micro_batch=2")
    ranks = {1: "1 rank", 2: "2 ranks", 4: "4 ranks"}  # it said "1 ranks"
    for world, workers in ((1, 0), (2, 3), (4, 3), (1, sequences), (1, sequences + 1), (2, sequences // 2 + 1)):
        cfg.data.num_workers = workers
        try:
            for rank in range(world):
                ShardLoader(data, "train", 2, rank=rank, world_size=world, num_workers=workers)
            loader_refuses = False
        except DataError as err:
            loader_refuses = "need at least one each" in str(err)
        assert loader_refuses == (world * max(1, workers) > sequences)
        if loader_refuses:
            with pytest.raises(
                ConfigError, match=rf"has {sequences} sequences but {ranks[world]} x {max(1, workers)} data.num_workers"
            ):
                check_runtime(cfg, world_size=world, device_type="cpu")
        else:
            check_runtime(cfg, world_size=world, device_type="cpu")

    def unbuilt(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(build_module, "build_model", unbuilt)
    cfg.data.num_workers = sequences + 1
    with pytest.raises(ConfigError, match=rf"{sequences + 1} data.num_workers = {sequences + 1} readers need"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_vocabulary_changed_by_the_data_is_named_at_resume(tmp_path, dataset):
    """The recipe's licenses trained 2 steps, then prepared again in the same folder with another
    tokenizer (2000 pieces) and the run resumed: 'checkpoint ... was written for a different model config
    (model.vocab_size: checkpoint 4096 vs config 2048); use the original config', though the config was
    unchanged: model.vocab_size followed the data. The message now names the data and that cause."""
    from pretrain.checkpoint import check_compatible, model_fingerprint

    cfg = own_config(tmp_path / "run", f"data.dir={dataset}")
    saved = dict(model_fingerprint(cfg), vocab_size=cfg.model.vocab_size + 64)
    with pytest.raises(ConfigError, match=rf"follows the tokenizer of the training data, {dataset}, unless set: was "):
        check_compatible(saved, cfg, tmp_path / "ckpt")
    saved = dict(model_fingerprint(cfg), dim=cfg.model.dim * 2)  # another change: no word of the data
    with pytest.raises(ConfigError, match=r"model.dim: checkpoint \d+ vs config \d+\); use the original config"):
        check_compatible(saved, cfg, tmp_path / "ckpt")
