"""Configuration of an exported memlayers model for Hugging Face transformers.

Self-contained: it imports transformers only. `config.json` carries the training
code's model hyper-parameters verbatim under "model"; this class derives the sizes the
forward needs (head dim, FFN width, value width) with the same rules as training.
"""

from transformers import PretrainedConfig

# Set from "model" below. save_pretrained writes every attribute, so a reload meets them again
# beside "model": the memlayers-only ones are not written (one copy); the names transformers and
# other tools read (hidden_size...) are, and any copy must agree with "model" (else editing
# "model" alone would be silently overridden by the copy).
OWN_SETTINGS = (
    "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden", "max_seq_len", "rope_theta",
    "norm_eps", "tie_embeddings", "memory_layers", "memory_n_keys", "memory_heads", "memory_k",
    "memory_k_dim", "memory_v_dim", "memory_qk_norm", "memory_shared_values",
)  # fmt: skip
HF_SETTINGS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings")


class MemlayersConfig(PretrainedConfig):
    model_type = "memlayers"

    def __init__(self, model=None, use_cache=True, **kwargs):
        model = dict(model or {})
        memory = dict(model.get("memory") or {})
        model["memory"] = memory
        self.model = model
        self.vocab_size = int(model.get("vocab_size", 512))
        self.dim = int(model.get("dim", 128))
        self.hidden_size = self.dim
        self.n_layers = int(model.get("n_layers", 4))
        self.num_hidden_layers = self.n_layers
        self.n_heads = int(model.get("n_heads", 4))
        self.num_attention_heads = self.n_heads
        self.n_kv_heads = int(model.get("n_kv_heads", 0)) or self.n_heads
        self.head_dim = self.dim // self.n_heads
        multiple_of = int(model.get("multiple_of", 32))
        hidden = int(8 * self.dim / 3)
        self.ffn_hidden = int(model.get("ffn_hidden", 0)) or multiple_of * ((hidden + multiple_of - 1) // multiple_of)
        self.max_seq_len = int(model.get("max_seq_len", 256))
        self.max_position_embeddings = self.max_seq_len
        self.rope_theta = float(model.get("rope_theta", 10000.0))
        self.norm_eps = float(model.get("norm_eps", 1e-5))
        self.tie_embeddings = bool(model.get("tie_embeddings", False))
        self.memory_layers = [int(i) for i in memory.get("layers", [])]
        self.memory_n_keys = int(memory.get("n_keys", 128))
        self.memory_heads = int(memory.get("heads", 4))
        self.memory_k = int(memory.get("k", 32))
        self.memory_k_dim = int(memory.get("k_dim", 256))
        self.memory_v_dim = int(memory.get("v_dim", 0)) or self.dim
        self.memory_qk_norm = bool(memory.get("qk_norm", True))
        self.memory_shared_values = bool(memory.get("shared_values", True))
        copies = {name: kwargs.pop(name) for name in OWN_SETTINGS + HF_SETTINGS if name in kwargs}
        disagree = [
            f"{name}={value!r} (model gives {getattr(self, name)!r})"
            for name, value in copies.items()
            if value != getattr(self, name)
        ]
        if disagree:
            raise ValueError(
                f'config.json: {", ".join(disagree)} beside "model" disagree with it; the model is built '
                'from "model": edit the setting there and remove these top-level copies (or make them agree)'
            )
        self.use_cache = use_cache  # transformers 5 reads it from the model config, not the base class
        kwargs.setdefault("tie_word_embeddings", False)  # both matrices are stored; loading keeps them equal
        super().__init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        for name in OWN_SETTINGS:
            out.pop(name, None)
        return out

    @property
    def num_value_tables(self) -> int:
        if not self.memory_layers:
            return 0
        return 1 if self.memory_shared_values else len(self.memory_layers)
