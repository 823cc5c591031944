"""Round trip: an exported model's logits equal the training model's, for ZeRO 0-3 at P = 1 and
ZeRO 1-3 at P = 2 (two gloo ranks); bf16 exports are the fp32 weights rounded."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pretrain.export import export_checkpoint, load, weight_specs
from pretrain.slots import load_table
from tests.export.export_helpers import assert_relative_close, fixed_tokens, training_logits
from tests.train.helpers import run_ranks

P2_STAGES = (1, 2, 3)


def _p2_suite(rank: int, root: str, cache: str) -> dict:
    from tests.export.export_helpers import train_and_record

    for stage in P2_STAGES:
        train_and_record(rank, f"{root}/zero{stage}", cache, [f"train.zero_stage={stage}"], parallel_size=2)
    return {}


@pytest.fixture(scope="module")
def trained_p2(tmp_path_factory, data_cache):
    root = tmp_path_factory.mktemp("export-p2")
    run_ranks(2, _p2_suite, (str(root), str(data_cache)), root / "results")
    return {stage: root / f"zero{stage}" for stage in P2_STAGES}


def _exported_logits(run_dir, out_dir) -> torch.Tensor:
    export_checkpoint(run_dir, out_dir, show_progress=False)
    model = load(out_dir)
    with torch.no_grad():
        return model(fixed_tokens())


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_export_matches_training_model_p1(trained, tmp_path, stage):
    got = _exported_logits(trained[stage], tmp_path / "export")
    assert_relative_close(got, training_logits(trained[stage]))


@pytest.mark.parametrize("stage", P2_STAGES)
def test_export_matches_training_model_p2(trained_p2, tmp_path, stage):
    run = trained_p2[stage]
    shards = sorted(p.name for p in (run / "checkpoints").glob("step_*/values.*.safetensors"))
    assert shards == ["values.t0.s0-of-2.safetensors", "values.t0.s1-of-2.safetensors"]
    got = _exported_logits(run, tmp_path / "export")
    assert_relative_close(got, training_logits(run))


def test_export_contents_and_names(trained, tmp_path):
    out = export_checkpoint(trained[1], tmp_path / "export", show_progress=False)
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "README.md",
            "config.json",
            "configuration_memlayers.py",
            "model.safetensors",
            "modeling_memlayers.py",
            "probes.jsonl",
            "slot_frequencies.safetensors",
            "tokenization_memlayers.py",
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    )
    weights = load_file(str(out / "model.safetensors"))
    model = load(out)
    assert list(weights) == list(model.state_dict())  # names and order = Transformer.state_dict()
    specs = weight_specs(model.cfg, torch.float32)
    assert [(n, s) for n, s, _ in specs] == [(n, tuple(t.shape)) for n, t in weights.items()]
    n = model.cfg.memory.num_slots
    assert weights["values.0.weight"].shape == (n, model.cfg.value_dim)
    # slot table and tokenizer are byte copies of the checkpoint's / dataset's
    ckpt = next((trained[1] / "checkpoints").glob("step_*"))
    assert (out / "slot_frequencies.safetensors").read_bytes() == (ckpt / "slot_frequencies.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert "training step: 2" in card and "manifest sha256" in card and "`values.0.weight`" in card
    assert f"- context: {model.cfg.max_seq_len} tokens (max_seq_len;" in card
    table = load_table(out)
    units = f"{table.num_documents:,} {table.granularity} units, {table.num_tokens:,} tokens, padding excluded"
    # the two token counts say what they count (a user compared 614,400 with 614,184)
    assert "- tokens seen: 512 (train.global_batch x data.seq_len positions per trained step, padding included)" in card
    assert f"Slot access counts: `slot_frequencies.safetensors` (steps 1-{table.step}, {units})." in card
    assert not list(tmp_path.glob(".export.tmp-*"))  # the temporary folder was renamed away


def test_value_pool_is_the_concatenation_of_its_shards(trained_p2, tmp_path):
    """The consolidated pool equals shard_files.consolidate (an independent assembly)."""
    from pretrain.parallel import shard_files

    run = trained_p2[3]
    out = export_checkpoint(run, tmp_path / "export", show_progress=False)
    ckpt = next((run / "checkpoints").glob("step_*"))
    assert torch.equal(
        load_file(str(out / "model.safetensors"))["values.0.weight"],
        shard_files.consolidate(ckpt)["values.0.weight"],
    )


def test_bf16_export_is_the_rounded_fp32_export(trained, tmp_path):
    fp32 = load_file(str(export_checkpoint(trained[2], tmp_path / "a", show_progress=False) / "model.safetensors"))
    bf16 = load_file(
        str(export_checkpoint(trained[2], tmp_path / "b", dtype="bf16", show_progress=False) / "model.safetensors")
    )
    assert fp32.keys() == bf16.keys()
    for name in fp32:
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name
    model = load(tmp_path / "b")
    assert model.tok_embeddings.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("stage", [0, 2])
def test_bf16_training_exports_the_fp32_masters(tmp_path, data_cache, stage):
    """Under bf16 the engine's module holds bf16 weights; the export holds DeepSpeed's fp32 master
    copies, which must round to exactly those bf16 weights."""
    from tests.export.export_helpers import train_and_record

    run = tmp_path / "run"
    train_and_record(0, str(run), str(data_cache), ["train.dtype=bf16", f"train.zero_stage={stage}"])
    out = export_checkpoint(run, tmp_path / "export", show_progress=False)
    exported = load_file(str(out / "model.safetensors"))
    module = torch.load(next((run / "checkpoints").glob("step_*")) / "mp_rank_00_model_states.pt", weights_only=True)[
        "module"
    ]
    assert module and all(v.dtype == torch.bfloat16 for v in module.values())
    for name, weight in module.items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name].to(torch.bfloat16), weight), name
    assert any(not torch.equal(exported[n], module[n].float()) for n in module)  # masters carry more bits


def _card_parameters(export) -> int:
    line = next(line for line in (export / "README.md").read_text().splitlines() if line.startswith("- parameters:"))
    return int(line.split()[2].replace(",", ""))


def _unique_parameters(model) -> int:
    """Each storage once (a tied output head shares the embeddings' storage)."""
    return sum({t.data_ptr(): t.numel() for t in model.state_dict().values()}.values())


def test_card_counts_each_parameter_once(trained, tmp_path, data_cache):
    """The card's parameter count is the loaded model's unique parameters: the output head once
    under tie_embeddings (twice before); the loading notes describe the KV-cached generate()."""
    from tests.export.export_helpers import train_and_record

    untied = export_checkpoint(trained[0], tmp_path / "untied", show_progress=False)
    tied_run = tmp_path / "tied-run"
    train_and_record(0, str(tied_run), str(data_cache), ["model.tie_embeddings=true", "train.zero_stage=0"])
    tied = export_checkpoint(tied_run, tmp_path / "tied", show_progress=False)
    tied_model, untied_model = load(tied), load(untied)
    assert tied_model.output.weight is tied_model.tok_embeddings.weight
    assert _card_parameters(untied) == _unique_parameters(untied_model)
    assert _card_parameters(tied) == _unique_parameters(tied_model)
    cfg = untied_model.cfg
    assert _card_parameters(untied) - _card_parameters(tied) == cfg.vocab_size * cfg.dim
    card = (tied / "README.md").read_text()
    assert "recomputes the whole sequence" not in card and "key/value cache" in card


def test_the_card_says_what_the_slot_table_counts_or_that_there_is_none(tmp_path):
    """The card said 'Slot access counts: slot_frequencies.safetensors' also for an export without
    one (a dense model, or slots.enabled=false); now it names the steps and units the table counts,
    from its header (first_step included), or says there is none."""
    from pretrain.export.card import slot_counts_line
    from pretrain.slots import SlotStatistics, save_table

    stats = SlotStatistics(16, ["layers.1"], granularity="sequence")
    stats.start_at(4)
    stats.update([torch.zeros(2 * 3, 1, 2, dtype=torch.long)], torch.zeros(2, 3, dtype=torch.long))
    stats.end_step(5)
    table = load_table(save_table(tmp_path / "t.safetensors", stats.reduce()))
    line = slot_counts_line(table.metadata)
    assert (
        line
        == "Slot access counts: `slot_frequencies.safetensors` (steps 5-5, 2 sequence units, 6 tokens, padding excluded)."
    )
    assert slot_counts_line(None).startswith("No slot access counts")
