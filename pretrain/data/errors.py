"""The one error type of the data pipeline: bad input, named with the file, key or value to fix."""

from __future__ import annotations


class DataError(ValueError):
    """Bad data input (missing path, empty corpus, corrupt shard, mismatched tokenizer, ...)."""
