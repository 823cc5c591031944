"""Standalone Hugging Face modeling code that `pretrain.export` writes into every export.

The modules here import only torch, sentencepiece and transformers (never this repository),
so an export directory loads with `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` and `AutoTokenizer.from_pretrained(dir, trust_remote_code=True)` on a
machine without memlayers. `SOURCE_FILES` lists what the export copies.
"""

from pathlib import Path

HF_DIR = Path(__file__).parent
SOURCE_FILES = ("configuration_memlayers.py", "modeling_memlayers.py", "tokenization_memlayers.py")
CONFIG_CLASS = "MemlayersConfig"
MODEL_CLASS = "MemlayersForCausalLM"
MODEL_TYPE = "memlayers"
TOKENIZER_CLASS = "MemlayersTokenizer"
TOKENIZER_AUTO_MAP = {"AutoTokenizer": [f"tokenization_memlayers.{TOKENIZER_CLASS}", None]}
