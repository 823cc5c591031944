"""The export's README.md: what was trained, on what, and the weight names and shapes."""

from __future__ import annotations

from pretrain.config import RunConfig
from pretrain.words import counted

ROLES = {
    "tok_embeddings.weight": "token embeddings (vocab, dim)",
    "attention_norm.weight": "RMSNorm before attention",
    "attention.wq.weight": "query projection (n_heads * head_dim, dim)",
    "attention.wk.weight": "key projection (n_kv_heads * head_dim, dim)",
    "attention.wv.weight": "value projection (n_kv_heads * head_dim, dim)",
    "attention.wo.weight": "attention output (dim, n_heads * head_dim)",
    "ffn_norm.weight": "RMSNorm before the FFN / memory layer",
    "ffn.w1.weight": "SwiGLU gate (hidden, dim)",
    "ffn.w3.weight": "SwiGLU up (hidden, dim)",
    "ffn.w2.weight": "SwiGLU down (dim, hidden)",
    "ffn.query_proj.weight": "memory query projection (heads * k_dim, dim)",
    "ffn.query_norm.weight": "RMSNorm of each half-query (k_dim / 2)",
    "ffn.keys1": "first half-key set (heads, n_keys, k_dim / 2)",
    "ffn.keys2": "second half-key set (heads, n_keys, k_dim / 2)",
    "ffn.gate_proj.weight": "Memory+ gate W1 (v_dim, dim)",
    "ffn.out_proj.weight": "Memory+ output W2 (dim, v_dim)",
    "norm.weight": "final RMSNorm",
    "output.weight": "output head (vocab, dim)",
    "values": "value pool (n_keys^2 slots, v_dim), slot id = i1 * n_keys + i2",
}


def role(name: str) -> str:
    if name.startswith("values."):
        return ROLES["values"]
    return next((text for suffix, text in ROLES.items() if name == suffix or name.endswith("." + suffix)), "")


def weight_table(specs) -> str:
    """A Markdown table of (name, shape, dtype, role), one row per tensor."""
    lines = ["| name | shape | dtype | role |", "|---|---|---|---|"]
    for name, shape, dtype in specs:
        lines.append(f"| `{name}` | {tuple(shape)} | {str(dtype).replace('torch.', '')} | {role(name)} |")
    return "\n".join(lines)


def slot_counts_line(header: dict[str, str] | None) -> str:
    """What the export's slot table counts, from its header; or that there is none."""
    if header is None:
        return "No slot access counts (the run counted none: no memory layers, or slots.enabled=false)."
    fields = ("step", "num_documents", "num_tokens", "granularity")
    if not all(header.get(k, "").strip() for k in fields):
        return "Slot access counts: `slot_frequencies.safetensors`."
    first = int(header.get("first_step", "0")) + 1
    return (
        f"Slot access counts: `slot_frequencies.safetensors` (steps {first}-{header['step']}, "
        f"{int(header['num_documents']):,} {header['granularity']} units, {int(header['num_tokens']):,} tokens, padding excluded)."
    )


def data_line(manifests: list[tuple[str, float, str]]) -> str:
    """The card's line on the training data: one dataset's manifest hash, or every source of a mixture."""
    if len(manifests) == 1:
        return f"data manifest sha256: `{manifests[0][2]}`"
    total = sum(weight for _, weight, _ in manifests)
    sources = "; ".join(
        f"{name} (weight {weight / total:.3f}, manifest sha256 `{sha}`)" for name, weight, sha in manifests
    )
    return f"data: a mixture of {len(manifests)} sources, sequences drawn by weight: {sources}"


def render_card(
    cfg: RunConfig,
    step: int,
    tokens: int,
    manifests: list[tuple[str, float, str]],
    dtype: str,
    specs,
    nbytes: int,
    params: int,
    slot_table: dict[str, str] | None = None,
) -> str:
    """The card; `manifests`: (name, weight, manifest sha256) of each dataset trained on (one: its hash
    alone; a mixture: each source's); `params` counts each parameter once (a tied output head shares the embeddings,
    while `specs` and model.safetensors list both names); `slot_table`: the header of the
    exported slot_frequencies.safetensors, None when the export has none."""
    m = cfg.model
    memory = (
        f"memory layers in blocks {list(m.memory.layers)}: {m.memory.n_keys}^2 = {m.memory.num_slots:,} slots, "
        f"{counted(m.memory.heads, 'head')} x top-{m.memory.k}, value dim {m.value_dim}"
        if m.memory.enabled
        else "no memory layers (dense baseline)"
    )
    return f"""# memlayers export

A decoder-only transformer with product-key memory layers (Memory+), exported from a
memlayers training checkpoint.

- training step: {step}
- tokens seen: {tokens:,} (train.global_batch x data.seq_len positions per trained step, padding included)
- {data_line(manifests)}
- model: {counted(m.n_layers, "layer")}, dim {m.dim}, {counted(m.n_heads, "head")}, vocab {m.vocab_size}; {memory}
- parameters: {params:,} ({nbytes / 2**20:.1f} MiB of {dtype} in model.safetensors)
- context: {m.max_seq_len} tokens (max_seq_len; prompt + new tokens at most {m.max_seq_len + 1}, longer is refused)

## Loading

With memlayers: `pretrain.export.load("<this folder>")`.
Without it: `transformers.AutoModelForCausalLM.from_pretrained("<this folder>", trust_remote_code=True)`
(modeling code in modeling_memlayers.py; `generate()` keeps a key/value cache, so each step
feeds only the new token).
Tokenizer: sentencepiece `tokenizer.model`. {slot_counts_line(slot_table)}

## Weights (model.safetensors)

{weight_table(specs)}
"""
