"""Export: training checkpoints -> portable model folders, and loading them back.

`export_checkpoint(source, out_dir, dtype="fp32"|"bf16", force=False)` writes
model.safetensors (names = `Transformer.state_dict()` keys, value pool consolidated),
config.json (also read by transformers through the standalone code in pretrain/hf),
tokenizer.model, slot_frequencies.safetensors and a model card. `load(dir)` returns the
`Transformer` on CPU or GPU without DeepSpeed. Modules: source (find and check the
checkpoint), dense (ZeRO weights), safetensors_io (streamed files), writer, card, loading,
errors; and what is done with an export: averaging (weighted mean of exports), perplexity (loss
on a prepared split), generation (sampling, the fact-probe quiz), scoring (log-likelihoods
through transformers) and lm_eval_tasks (lm-evaluation-harness tasks of the fact probes).

The names below are imported from their modules on first use, so that a tool's refusal of a missing
or wrong folder (pretrain.export.folders) comes before torch is imported.
"""

from __future__ import annotations

from pretrain.lazy_names import lazy_names

# name -> the module of this package that defines it
_MODULE_OF = {
    "ExportError": "errors",
    "IncompleteFileError": "errors",
    "load": "loading",
    "export_checkpoint": "writer",
    "weight_specs": "writer",
}

__all__ = sorted(_MODULE_OF)
__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
