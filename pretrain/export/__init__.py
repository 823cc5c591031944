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
"""

from pretrain.export.errors import ExportError, IncompleteFileError
from pretrain.export.loading import load
from pretrain.export.writer import export_checkpoint, weight_specs

__all__ = ["ExportError", "IncompleteFileError", "export_checkpoint", "load", "weight_specs"]
