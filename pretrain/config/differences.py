"""Where two config trees differ: every key, or only the keys that make two models different sets
of weights (resume, init_from and averaging compare saved configs with these)."""

from __future__ import annotations


def config_differences(a, b, prefix: str = "") -> dict[str, tuple]:
    """{dotted key: (a's value, b's value)} for every leaf where two config trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = {}
        for key in sorted(set(a) | set(b)):
            out.update(config_differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: (a, b)} if a != b else {}


MODEL_RUNTIME_KEYS = ("memory.kernel", "memory.parallel_size", "document_attention")  # how it runs, not what it is


def model_differences(a: dict, b: dict) -> dict[str, tuple]:
    """config_differences of two model sections, ignoring MODEL_RUNTIME_KEYS: the keys in which
    two models differ as sets of weights."""
    diffs = config_differences(a, b)
    for key in MODEL_RUNTIME_KEYS:
        diffs.pop(key, None)
    return diffs
