"""The export loads in transformers without this repository (offline) with the same logits and
generates; tools/generate.py samples and answers the fact probes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pretrain.export import export_checkpoint, load
from tests.export.export_helpers import (
    OracleModel,
    assert_relative_close,
    fixed_tokens,
    run_transformers_offline,
    training_logits,
)

HF_SCRIPT = r"""
import json, sys
import torch
from safetensors.torch import save_file
# the repository may be pip-installed in this environment: make its packages unimportable
for name in ("pretrain", "kernels", "tools"):
    sys.modules[name] = None
from transformers import AutoModelForCausalLM
export_dir, tokens_path, out_path = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True, dtype=torch.float32).eval()
tokens = torch.load(tokens_path, weights_only=True)
with torch.no_grad():
    logits = model(tokens).logits
greedy = model.generate(tokens[:1, :6], max_new_tokens=10, do_sample=False)
sampled = model.generate(tokens[:1, :6], max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.8)
save_file({"logits": logits.contiguous(), "greedy": greedy, "sampled": sampled}, out_path)
print(json.dumps({"class": type(model).__name__}))
"""


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    return export_checkpoint(trained[1], tmp_path_factory.mktemp("hf") / "export", show_progress=False)


def test_transformers_loads_the_export_offline_without_this_repo(exported, trained, tmp_path):
    tokens = fixed_tokens()
    torch.save(tokens, tmp_path / "tokens.pt")
    proc = run_transformers_offline(
        HF_SCRIPT, [str(exported), str(tmp_path / "tokens.pt"), str(tmp_path / "out.safetensors")], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["class"] == "MemlayersForCausalLM"
    out = load_file(str(tmp_path / "out.safetensors"))
    model = load(exported)
    with torch.no_grad():
        ours = model(tokens)
    assert_relative_close(out["logits"], ours)
    assert_relative_close(out["logits"], training_logits(trained[1]))
    # greedy generate() equals a greedy loop over pretrain.export.load's model
    seq = tokens[:1, :6]
    for _ in range(10):
        with torch.no_grad():
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out["greedy"], seq)
    sampled = out["sampled"]
    assert sampled.shape[1] > 6 and torch.equal(sampled[:, :6], tokens[:1, :6])
    assert int(sampled.max()) < model.cfg.vocab_size


def test_generate_tool_samples_and_answers_probes(exported, capsys):
    from pretrain.data import Tokenizer, load_probes
    from pretrain.evaluate import encode_probes, fact_recall
    from tools.generate import main

    assert main([str(exported), "--prompt", "The", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert (
        main(
            [
                str(exported),
                "--prompt",
                "The",
                "--max-new-tokens",
                "5",
                "--temperature",
                "0.8",
                "--top-p",
                "0.9",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main([str(exported), "--probes", "12"]) == 0
    printed = capsys.readouterr().out
    accuracy = float(printed.strip().splitlines()[-1].split()[1])
    # reference: teacher-forced greedy exact match (pretrain.evaluate), an independent formulation
    tok = Tokenizer(exported / "tokenizer.model")
    model = load(exported)
    trained = [p for p in load_probes(exported) if not p.is_new_fact]  # what --probes asks, as the run's recall
    batch = encode_probes(trained[:12], tok, model.cfg.max_seq_len)
    want = fact_recall(model, batch, torch.device("cpu"))["fact_recall"]
    assert accuracy == pytest.approx(want, abs=1e-3)


def test_nucleus_sampling_keeps_the_top_p_mass():
    from pretrain.export.generation import next_token

    logits = torch.tensor([3.0, 2.0, 1.0, -5.0])
    probs = torch.softmax(logits.double(), 0)
    gen = torch.Generator().manual_seed(0)
    draws = [next_token(logits, 1.0, 0.8, gen) for _ in range(400)]
    # top_p=0.8: tokens 0 (p=.66) and 1 (p=.24) form the smallest prefix reaching 0.8
    assert set(draws) == {0, 1}
    share = draws.count(0) / len(draws)
    assert abs(share - probs[0] / (probs[0] + probs[1])) < 0.07
    assert next_token(logits, 0.0, 1.0, gen) == 0
    with pytest.raises(ValueError, match="top_p"):
        next_token(logits, 1.0, 0.0, gen)


def test_answer_probes_scores_exact_greedy_answers(exported):
    from pretrain.data import Tokenizer, load_probes
    from pretrain.export.generation import answer_probes

    tok = Tokenizer(exported / "tokenizer.model")
    probes = load_probes(exported)[:6]
    sequences = []
    for i, probe in enumerate(probes):
        answer = probe.answer if i % 2 == 0 else "zzz" + probe.answer  # odd probes: the oracle knows a wrong answer
        sequences.append([tok.eos_id] + tok.encode(f"{probe.question} {answer}"))
    result = answer_probes(OracleModel(sequences, 384), tok, probes)
    assert [row["correct"] for row in result["rows"]] == [True, False] * 3
    assert result["accuracy"] == 0.5 and result["count"] == 6


def test_start_token_is_the_document_separator_everywhere(inference_export, hf_model, monkeypatch, capsys):
    """Training starts documents after EOS and never sees sentencepiece's BOS: config.json's
    bos_token_id, the HF tokenizer's bos (lm_eval's loglikelihood prefix) and transformers'
    unconditional generate() all use the id tools/generate.py prepends to an empty prompt."""
    from transformers import AutoTokenizer

    import pretrain.export.generation
    from pretrain.data import Tokenizer
    from tools.generate import main

    real_generate, prompts = pretrain.export.generation.generate, []
    monkeypatch.setattr(
        pretrain.export.generation, "generate", lambda model, prompt, *a, **k: prompts.append(prompt) or []
    )
    assert main([str(inference_export), "--prompt", "", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    tok = Tokenizer(inference_export / "tokenizer.model")
    assert prompts == [[tok.eos_id]] and tok.bos_id != tok.eos_id  # the empty prompt is the separator
    start = prompts[0][0]
    config = json.loads((inference_export / "config.json").read_text())
    assert config["bos_token_id"] == start == hf_model.config.bos_token_id
    assert AutoTokenizer.from_pretrained(inference_export, trust_remote_code=True).bos_token_id == start
    with torch.no_grad():
        out = hf_model.generate(max_new_tokens=6, do_sample=False)[0].tolist()  # no prompt, the defaults
    native = real_generate(load(inference_export), [start], 6, eos_id=tok.eos_id)
    assert len(native) > 1  # a continuation, not an immediate EOS
    assert out == [start] + native + ([tok.eos_id] if len(native) < 6 else [])  # transformers keeps the EOS
