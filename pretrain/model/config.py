"""Model hyper-parameters: the transformer and its product-key memory layers.

These dataclasses are the only thing the model code reads. They are plain data,
validated by `validate()` with errors that name the config key to fix.

String choices are `Literal` types: `check_choices` validates every such field of a config
dataclass from its annotation, so a new choice is added in one place (the Literal).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


def choices_message(key: str, value, choices: tuple) -> str:
    """'train.dtype='fp8' must be fp32, bf16 or fp16': the key, the value and the allowed choices."""
    names = [str(c) for c in choices]
    allowed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
    return f"{key}={value!r} must be {allowed}"


def default_hint(key: str, cls: type) -> str:
    """How a refusal names a key's default: ' (the default: train.max_steps=300)', the default of the
    field of dataclass `cls` that `key` ends in, written as YAML reads it (false, 1e-05); '' where there
    is none to show (a list, null, an empty text)."""
    name = key.rsplit(".", 1)[-1]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    value = fields[name].default if name in fields else None
    if isinstance(value, bool):
        value = str(value).lower()
    elif not (isinstance(value, (int, float)) or (isinstance(value, str) and value)):
        return ""
    return f" (the default: {key}={value})"


@functools.cache
def literal_fields(cls: type) -> dict[str, tuple]:
    """The fields of dataclass `cls` typed `Literal[...]`, with their allowed values."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: typing.get_args(hints[f.name])
        for f in dataclasses.fields(cls)
        if typing.get_origin(hints[f.name]) is Literal
    }


def check_choices(section, prefix: str = "") -> None:
    """Raise ConfigError if a Literal-typed field of the dataclass `section` (or of a nested
    section) holds a value outside its choices."""
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        choices = literal_fields(type(section)).get(f.name)
        if choices is not None and value not in choices:
            raise ConfigError(choices_message(key, value, choices))
        if dataclasses.is_dataclass(value):
            check_choices(value, key)


@dataclass
class MemoryConfig:
    """Product-key memory ("Memory+") settings, shared by every memory layer."""

    layers: list[int] = field(default_factory=list)  # which blocks' FFNs become memory layers
    n_keys: int = 128  # half-keys per set; N = n_keys**2 slots
    heads: int = 4
    k: int = 32  # slots read per head
    k_dim: int = 256  # query/key dimension (each half-key has k_dim // 2)
    v_dim: int = 0  # value dimension; 0 means "model dim"
    qk_norm: bool = True
    shared_values: bool = True  # one value table for all memory layers (the anchor's default)
    kernel: Literal["auto", "triton", "torch"] = "auto"
    parallel_size: int = 1  # memory-parallel group size (columns of the value table)

    @property
    def num_slots(self) -> int:
        return self.n_keys * self.n_keys

    @property
    def enabled(self) -> bool:
        return len(self.layers) > 0

    @property
    def num_value_tables(self) -> int:
        """One table shared by every memory layer, or one per layer; none without memory layers."""
        return (1 if self.shared_values else len(self.layers)) if self.enabled else 0


@dataclass
class ModelConfig:
    """A decoder-only transformer; some blocks' FFNs may be memory layers."""

    vocab_size: int = 512
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means n_heads (no grouped-query attention)
    ffn_hidden: int = 0  # 0 means the SwiGLU default: 8/3 * dim rounded up to multiple_of
    multiple_of: int = 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    # how attention applies data.document_masking: sdpa (a dense boolean mask) | flex (a FlexAttention
    # block mask that skips blocks outside every document; training needs CUDA) -- document_attention.py
    document_attention: Literal["sdpa", "flex"] = "sdpa"
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @property
    def value_dim(self) -> int:
        return self.memory.v_dim or self.dim

    def validate(self, prefix: str = "model") -> "ModelConfig":
        """Raise ConfigError naming the offending key; return self when valid. Pure: reads
        nothing but the config (the device and kernels are checked by the trainer at start)."""
        m, p = self.memory, prefix
        check_choices(self, p)
        for key in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{p}.{key} must be positive, got {getattr(self, key)}")
        if self.n_kv_heads < 0:
            raise ConfigError(f"{p}.n_kv_heads={self.n_kv_heads} must be >= 0 (0 means {p}.n_heads)")
        if self.ffn_hidden < 0:
            raise ConfigError(
                f"{p}.ffn_hidden={self.ffn_hidden} must be >= 0 (0 means the SwiGLU default from {p}.dim, "
                f"rounded up to {p}.multiple_of)"
            )
        if self.multiple_of <= 0:
            raise ConfigError(
                f"{p}.multiple_of={self.multiple_of} must be positive (the default FFN width is rounded up to a "
                "multiple of it; e.g. 32)"
            )
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 0):
            # theta <= 0 makes the rotary table NaN, and attention then runs on without an error
            raise ConfigError(
                f"{p}.rope_theta={self.rope_theta} must be a positive number, the rotary base"
                + default_hint(f"{p}.rope_theta", ModelConfig)
            )
        for key in ("norm_eps", "init_std"):
            # inf: norm_eps made every norm's output 0 (a model that trained on without learning), init_std
            # non-finite weights (a non-finite loss at step 1, after the build and a checkpoint)
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ConfigError(
                    f"{p}.{key}={getattr(self, key)} must be >= 0 and finite" + default_hint(f"{p}.{key}", ModelConfig)
                )
        if self.dim % self.n_heads:
            raise ConfigError(f"{p}.dim={self.dim} must be divisible by {p}.n_heads={self.n_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"{p}.dim / {p}.n_heads = {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ConfigError(f"{p}.n_heads={self.n_heads} must be divisible by {p}.n_kv_heads={self.kv_heads}")
        bad = [i for i in m.layers if not 0 <= i < self.n_layers]
        if bad:
            raise ConfigError(
                f"{p}.memory.layers={list(m.layers)} names layer(s) {bad} outside the model "
                f"({p}.n_layers={self.n_layers}: valid indices are 0..{self.n_layers - 1})"
            )
        if len(set(m.layers)) != len(m.layers):
            raise ConfigError(f"{p}.memory.layers={list(m.layers)} lists a layer twice")
        if not m.enabled:
            return self
        for key in ("n_keys", "heads", "k"):
            if getattr(m, key) <= 0:
                raise ConfigError(
                    f"{p}.memory.{key}={getattr(m, key)} must be positive"
                    + default_hint(f"{p}.memory.{key}", MemoryConfig)
                )
        if m.k > m.n_keys:
            raise ConfigError(
                f"{p}.memory.k={m.k} exceeds {p}.memory.n_keys={m.n_keys}: top-k per half-key set "
                f"needs k <= n_keys (lower k or raise n_keys)"
            )
        if m.k_dim <= 0 or m.k_dim % 2:
            raise ConfigError(f"{p}.memory.k_dim={m.k_dim} must be a positive even number (two half-keys)")
        if m.v_dim < 0:
            raise ConfigError(f"{p}.memory.v_dim={m.v_dim} must be >= 0 (0 means {p}.dim)")
        if m.parallel_size <= 0 or self.value_dim % m.parallel_size:
            raise ConfigError(
                f"{p}.memory.parallel_size={m.parallel_size} must be positive and divide the value dim "
                f"({self.value_dim}, from {p}.memory.v_dim or {p}.dim)"
            )
        return self
