"""Prompts with special-token text ("</s>"): memlayers-generate reads and prints them as the export's
Hugging Face tokenizer (pretrain/hf/tokenization_memlayers.py, loaded by AutoTokenizer) does.
Before, `--prompt "</s>"` was encoded as the characters <, /, s, > (five ids, not EOS)."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from pretrain.data import Tokenizer, build_fact_world
from pretrain.data.tokenizer import train_tokenizer

TEXTS = [
    "</s>",
    "</s></s>",
    "a</s>b",
    "Hello </s> world",
    " </s> ",
    "\n</s>\n",
    "The city</s>The",
    "x  </s>  y",
    "<unk>",
    "<pad>",
    "<s>",  # sentencepiece's BOS piece: not a special token of the export, plain text
    "</s",
    "<</s>>",
    "",
    "The capital of Aldmere is",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A trained tokenizer with the files an export ships for AutoTokenizer."""
    from pretrain.export.writer import hf_tokenizer_config
    from pretrain.hf import HF_DIR

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(build_fact_world(200, seed=0).train_documents, out / "tokenizer.model", vocab_size=512)
    shutil.copyfile(HF_DIR / "tokenization_memlayers.py", out / "tokenization_memlayers.py")
    (out / "tokenizer_config.json").write_text(json.dumps(hf_tokenizer_config(32)))
    return out


@pytest.fixture(scope="module")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=True)


def mixtures(count: int, seed: int = 0) -> list[str]:
    parts = ["</s>", "<unk>", "<pad>", "<s>", " ", "  ", "\n", "The city", "a", "</s", "s>", "<", "Aldmere"]
    rng = random.Random(seed)
    return ["".join(rng.choice(parts) for _ in range(rng.randint(1, 7))) for _ in range(count)]


def test_prompts_encode_and_decode_as_the_exports_hf_tokenizer_does(tokenizer_dir, hf_tokenizer):
    tok = Tokenizer(tokenizer_dir / "tokenizer.model")
    assert tok.special_tokens == dict(zip(hf_tokenizer.all_special_tokens, hf_tokenizer.all_special_ids))
    for text in TEXTS + mixtures(200):
        expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tok.encode_with_special_tokens(text) == expected, text
        assert tok.decode_with_special_tokens(expected) == hf_tokenizer.decode(expected), text
    assert tok.encode_with_special_tokens("</s>") == [tok.eos_id]
    rng = random.Random(1)
    for _ in range(200):  # any ids, a model's continuation included
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 12))]
        assert tok.decode_with_special_tokens(ids) == hf_tokenizer.decode(ids), ids
    text = "The capital of Aldmere is"  # without special text: encode and decode as before
    assert tok.encode_with_special_tokens(text) == tok.encode(text)
    assert tok.decode_with_special_tokens(tok.encode(text)) == tok.decode(tok.encode(text)) == text


def test_generate_reads_and_prints_special_token_text_as_the_hf_tokenizer(
    tokenizer_dir, hf_tokenizer, monkeypatch, capsys
):
    import pretrain.export
    import pretrain.export.generation
    from tools.generate import main

    tok = Tokenizer(tokenizer_dir / "tokenizer.model")
    continuation = tok.encode("The city")
    prompts = []

    def generate(model, prompt, *args, **kwargs):
        prompts.append(prompt)
        return continuation

    monkeypatch.setattr(pretrain.export, "load", lambda *a, **k: None)
    monkeypatch.setattr(pretrain.export.generation, "generate", generate)
    for text in ("</s>Alice", "Alice</s>", "a <unk> b", "The city"):
        assert main([str(tokenizer_dir), "--prompt", text, "--max-new-tokens", str(len(continuation))]) == 0
        expected = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        start = [] if expected[0] == tok.eos_id else [tok.eos_id]  # "</s>Alice" brings its own separator
        assert prompts[-1] == [*start, *expected], text
        assert capsys.readouterr().out == hf_tokenizer.decode(expected + continuation) + "\n", text


def test_a_prompt_starting_with_the_separator_is_fed_as_the_hf_model_is_fed(
    tokenizer_dir, hf_tokenizer, monkeypatch, capsys
):
    """memlayers-generate put its start token before every prompt, so "</s>question" (the fact tasks'
    prompt, docs/export-and-eval.md's way to start a new document) ran as [EOS, EOS, question]: an empty document
    training never holds, and not what transformers' generate() or lm-eval feed for the same text
    (9 of 100 greedy fact answers differed on a 200-step fact-world export)."""
    import pretrain.export
    import pretrain.export.generation
    from tools.generate import main

    tok = Tokenizer(tokenizer_dir / "tokenizer.model")
    prompts = []
    monkeypatch.setattr(pretrain.export, "load", lambda *a, **k: None)
    monkeypatch.setattr(
        pretrain.export.generation, "generate", lambda model, prompt, *a, **k: prompts.append(prompt) or []
    )
    for text in ("</s>Q: Where was Alice born? A:", "</s></s>x", "</s>"):
        assert main([str(tokenizer_dir), "--prompt", text, "--max-new-tokens", "2"]) == 0
        assert prompts[-1] == hf_tokenizer(text, add_special_tokens=False)["input_ids"], text
        assert prompts[-1][:1] == [tok.eos_id] and capsys.readouterr().out == text + "\n"
    assert main([str(tokenizer_dir), "--prompt", "Alice", "--max-new-tokens", "2"]) == 0
    assert prompts[-1] == [tok.eos_id, *tok.encode("Alice")]  # a plain prompt still gets the start token
